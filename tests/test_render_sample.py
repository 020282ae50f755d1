from rich.cells import cell_len

from tfcli.render.sample import batch_progress, tail_cells


def test_tail_cells_keeps_the_end_that_fits_and_shows_line_breaks():
    assert tail_cells("hello\nworld", 7) == "o⏎world"
    assert tail_cells("ab", 10) == "ab"
    assert tail_cells("一二三四", 5) == "三四"  # two cells each: a third would not fit
    assert cell_len(tail_cells("一二三四", 5)) <= 5


def test_batch_progress_has_a_numbered_line_per_sample_within_the_width():
    view = batch_progress("ROMEO:", ["\nWhat say you", "", "x" * 500], width=40)
    lines = view.plain.split("\n")
    assert [line.split(" │ ")[0] for line in lines] == ["1", "2", "3"]
    assert lines[0].endswith("ROMEO:⏎What say you") and lines[1].endswith("ROMEO:")
    assert all(cell_len(line) < 40 for line in lines) and lines[2].endswith("x")


def test_batch_progress_fits_the_screen_and_counts_the_rest():
    tails = ["abc"] * 12
    lines = batch_progress("", tails, width=40, height=8).plain.split("\n")
    assert len(lines) == 7 and lines[-1] == "… and 6 more" and lines[0].startswith(" 1 │ ")
    assert len(batch_progress("", tails[:7], width=40, height=8).plain.split("\n")) == 7  # fits: all shown


def test_text_for_a_terminal_has_its_control_characters_as_symbols_one_for_one():
    from tfcli.render.sample import batch_progress, for_terminal, styled

    assert for_terminal("a\tb\n\x1b[31m\x07\x7f\x9b\r") == "a\tb\n␛[31m␇␡◌␍"
    assert styled("x\x1b", [0.0, -1.0]).plain == "x␛"  # (--color-by-prob: still one character per log-prob)
    assert "a␛␇" in batch_progress("a\x1b", ["\x07"], 80).plain
    assert for_terminal("a\tb\x1b[0m\x7f\x9b", unicode=False) == "a\tb^[[0m^??"  # (an ASCII terminal)
    # (an override would reorder the rest of the line on a bidi terminal; Hebrew's marks and joiners stay)
    assert for_terminal("a\u202eb\u2066c\u2069 \u05d0\u200f\u05d1 👩\u200d👧") == "a◌b◌c◌ \u05d0\u200f\u05d1 👩\u200d👧"
    assert for_terminal("\u202a\u202e\u2068", unicode=False) == "???"
    tabbed = batch_progress("", ["ab\t" * 20, "x"], 20).plain.splitlines()[0]
    assert tabbed.endswith("ab⇥") and len(tabbed) <= 20  # a tab takes one cell here, not up to eight on screen
