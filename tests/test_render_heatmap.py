import io
import re
from html.parser import HTMLParser
from xml.etree import ElementTree

import numpy as np
import pytest
from rich.cells import cell_len
from rich.console import Console

from tfcli.inspect import PATTERNS, GeneratedStep, Generation, HeadPattern, Lens
from tfcli.render.attention_views import export, generated_view, lens_view, summary_view
from tfcli.render.heatmap import INVISIBLE, MASKED, focus_view, grid_view, head_view, legend, visible

ANSI = re.compile(r"\x1b\[")
SHADES = set("░▒▓█")


def causal(t: int, seed: int = 0) -> np.ndarray:
    """A random causal attention matrix whose rows sum to 1 over the past."""
    w = np.tril(np.random.default_rng(seed).random((t, t)) + 0.01)
    return w / w.sum(axis=1, keepdims=True)


def stack(layers: int, heads: int, t: int) -> np.ndarray:
    return np.stack([np.stack([causal(t, 10 * li + h) for h in range(heads)]) for li in range(layers)])


def render(renderable, *, color: bool = False, width: int = 80) -> str:
    console = Console(
        width=width,
        file=io.StringIO(),
        color_system="truecolor" if color else None,
        force_terminal=color,
        legacy_windows=False,
    )
    console.print(renderable)
    return console.file.getvalue()


def body(out: str, t: int, *, title: bool = False) -> tuple[str, list[str]]:
    """Split head_view output into its header line and its t query rows."""
    lines = out.splitlines()[int(title):]
    return lines[0], lines[1:1 + t]


def test_visible_marks_whitespace_and_controls():
    assert visible(" ") == "␣"
    assert visible("\n") == "⏎"
    assert visible("\t") == "⇥"
    assert visible("\r") == "␍"
    assert visible("\x00") == "␀"
    for invisible in ("\u200b", "\u200d", "\u202e", "\ufe0f"):  # never MASKED: that is the masked future
        assert visible(invisible) == INVISIBLE != MASKED
    assert visible("\u0301") == INVISIBLE + "\u0301"
    for sign in ("\u0947", "\u093f", "\u0e34", "\u20dd"):  # Devanagari e and i, Thai i, an enclosing circle
        assert visible(sign) == INVISIBLE + sign  # (combining class 0, yet a mark: its base is shown)
    assert visible("\U000e0100") == INVISIBLE  # (a variation selector has nothing to show)
    assert visible("a") == "a"
    assert visible("é") == "é"
    assert visible("中") == "中"


def test_masked_future_cells_are_shown_as_masked_and_past_cells_are_not():
    t = 6
    _, rows = body(render(head_view(causal(t), "abcdef")), t)
    for i, row in enumerate(rows):
        cells = row[5:]  # "0 a  " label: 1 digit + space + 2-cell glyph + space
        pairs = [cells[2 * j:2 * j + 2] for j in range(t)]
        assert all(p.strip() == MASKED for p in pairs[i + 1:]), row
        assert all(MASKED not in p for p in pairs[:i + 1]), row


def test_zero_weight_is_drawn_differently_from_masked():
    w = np.array([[1.0, 0.0], [0.0, 1.0]])
    _, rows = body(render(head_view(w, "ab", color=False)), 2)
    assert rows[0] == "0 a  ██" + MASKED + " "  # the dot under its column's letter (header "     a b ")
    assert rows[1][5:7] == "  "  # a real 0 is the lightest shade, not the masked dot


def test_whitespace_shows_as_visible_glyphs_in_header_and_row_labels():
    text = "a b\nc\td"
    out = render(head_view(causal(len(text)), text))
    header, rows = body(out, len(text))
    for glyph in "␣⏎⇥":
        assert glyph in header
    assert [row.split()[1] for row in rows] == ["a", "␣", "b", "⏎", "c", "⇥", "d"]


def test_wide_characters_keep_rows_and_header_aligned():
    text = "你好, 世界!"
    out = render(head_view(causal(len(text)), text, title="cjk"))
    header, rows = body(out, len(text), title=True)
    widths = {cell_len(row) for row in rows}
    assert len(widths) == 1
    assert cell_len(header) == widths.pop()
    # each header glyph starts exactly where its 2-cell column starts
    label = cell_len(rows[0]) - 2 * len(text)
    assert header[:label].strip() == ""
    assert header[label:].startswith("你好,")


def test_long_prompt_is_windowed_to_the_last_positions_with_a_note():
    t = 120
    text = "".join(chr(ord("a") + i % 26) for i in range(t))
    out = render(head_view(causal(t), text, max_width=80))
    assert all(cell_len(line) <= 80 for line in out.splitlines())
    note = re.search(r"showing positions (\d+):(\d+) of 120", out)  # as --range takes them: end excluded
    assert note, out
    first, last = int(note[1]), int(note[2]) - 1
    assert last == t - 1 and first > 0
    assert f"{last} {text[-1]}" in out and f"{first - 1} " not in out


def test_offset_shifts_position_labels_and_note():
    t = 100
    out = render(head_view(causal(t), "x" * t, offset=50))
    assert "of 50:150" in out
    assert "149 x" in out


def test_single_position_renders_one_cell():
    out = render(head_view(np.array([[1.0]]), "q"))
    header, rows = body(out, 1)
    assert header.strip() == "q"
    assert rows[0].endswith("██")
    assert MASKED + " masked" in out


def test_color_off_uses_shade_blocks_and_no_ansi_even_on_a_color_terminal():
    out = render(head_view(causal(8), "colorful", title="t"), color=False)
    colored_console = render(head_view(causal(8), "colorful", title="t", color=False), color=True)
    assert SHADES & set(out)
    assert not ANSI.search(colored_console)
    assert SHADES & set(colored_console)


def test_color_on_paints_cells_with_truecolor():
    out = render(head_view(causal(4), "abcd"), color=True)
    assert "\x1b[38;2;" in out


def test_legend_shows_scale_max_and_masked_meaning():
    out = render(legend(0.83, color=False))
    assert "0.83" in out and "░" in out and "masked" in out and "max shown" in out


def test_the_first_characters_row_is_left_out_of_the_scale_only_where_it_is_the_first_the_model_saw():
    w = np.array([[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.4, 0.4]])  # row 0 always 1: it sees only itself
    plain = render(head_view(w, "abc", color=False))
    aside = render(head_view(w, "abc", first_sees_itself=True, color=False))
    assert "1.00 (scaled to max shown)" in plain
    assert "0.50 (scaled to max shown, first row aside)" in aside
    assert "▒▒▒▒" in body(plain, 3)[1][1]
    _, rows = body(aside, 3)
    assert "████" in rows[1] and "██" in rows[0]  # 0.5 is now the top of the scale; row 0's 1 clamps to it
    assert rows[2].endswith("▒▒▓▓▓▓")  # 0.2 and 0.4 of 0.5
    grid = render(grid_view(w[None, None], "abc", first_sees_itself=True))
    assert "0.50 (scaled to max shown, first row aside)" in grid
    wide = render(head_view(np.tril(np.ones((60, 60))) / np.arange(1, 61)[:, None], "x" * 60,
                            first_sees_itself=True))
    assert "first row aside" not in wide  # the window starts after position 0: nothing to leave out


def test_grid_view_shows_every_layer_and_head_label():
    out = render(grid_view(stack(3, 4, 10), "abcdefghij", layer_labels=[2, 5, 7]))
    for layer in (2, 5, 7):
        for h in range(4):
            assert f"L{layer} H{h}" in out
    assert "L0 H0" not in out
    assert all(cell_len(line) <= 80 for line in out.splitlines())


def test_notes_wrap_at_spaces_on_a_narrow_terminal_instead_of_being_cut():
    out = render(head_view(causal(120), "y" * 120, max_width=40), width=40)
    assert all(cell_len(line) <= 40 for line in out.splitlines())
    words = " ".join(out.split())
    assert "(--range A:B picks others)" in words and "masked (future)" in out
    assert "attention to earlier keys is not drawn" in words  # (rows read as attending only nearby)


def test_lens_and_summary_on_a_narrow_terminal_drop_candidates_or_wrap_never_cut_a_number_or_word():
    top = [(c, 0.04 * (i + 1)) for i, c in enumerate("abcde")]
    lens = Lens(1, ["embed", "L0"], [top, top], "a", [0.04, 0.04])
    out = render(lens_view(lens, "xay", color=False, max_width=40), width=40)
    rows = [line.split() for line in out.splitlines() if line.split()[0] in ("embed", "L0")]
    assert rows[0] == ["embed", "a", "0.04", "b", "0.08", "c", "0.12", "0.04"]  # three fit; p(a) kept whole
    assert "(the last row is the output)" in out and all(cell_len(line) <= 40 for line in out.splitlines())
    heads = [HeadPattern(0, 0, {p: 0.5 for p in PATTERNS}, 0.5, "previous")]
    out = render(summary_view(heads, heads, "abc", 3, 0.4, color=False, max_width=40), width=40)
    assert "mean share of attention" in " ".join(out.split()) and "…" not in out.split("on the probe")[0]
    assert all(cell_len(line) <= 40 for line in out.splitlines())
    on_prompt = out.split("on the probe")[0]  # the columns that do not fit come in a second block, not cut
    headers = [line.split() for line in on_prompt.splitlines() if line.startswith(" ") and "label" in line]
    assert len(headers) == 2 and "ind" in headers[1] and headers[1][-1] == "entropy"
    rows = [line.split() for line in on_prompt.splitlines() if line.startswith("L0")]
    assert [r[:3] for r in rows] == [["L0", "H0", "previous"]] * 2 and rows[1][-1] == "0.50"


def test_grid_view_windows_long_prompts_to_fit():
    t = 90
    out = render(grid_view(stack(1, 4, t), "z" * t, color=False))
    assert all(cell_len(line) <= 80 for line in out.splitlines())
    assert re.search(r"showing positions \d+:90 of 90", out)


def test_grid_view_rejects_wrong_number_of_layer_labels():
    with pytest.raises(ValueError):
        grid_view(stack(2, 1, 3), "abc", layer_labels=[0])


def test_focus_view_ranks_the_largest_weight_first():
    w = np.zeros((1, 1, 4, 4))
    w[0, 0, 3] = [0.1, 0.6, 0.05, 0.25]
    out = render(focus_view(w, "ab c", 3, top=3))
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[1] for line in lines] == ["1", "3", "0"]
    assert lines[0].split()[0] == "b" and lines[0].rstrip().endswith("0.60")
    assert lines[2].split()[0] == "a"
    bars = [line.count("█") for line in lines]
    assert bars == sorted(bars, reverse=True)


@pytest.mark.parametrize("width", [80, 30, 16])
def test_focus_view_bars_shrink_on_a_narrow_terminal_and_never_cut_a_weight(width):
    w = np.zeros((1, 1, 4, 4))
    w[0, 0, 3] = [0.1, 0.6, 0.05, 0.25]
    out = render(focus_view(w, "ab c", 3, top=3, max_width=width), width=width)
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[-1] for line in lines] == ["0.60", "0.25", "0.10"]
    assert all(cell_len(line) <= width for line in out.splitlines())
    widest = max(cell_len(line.rstrip()) for line in lines)
    assert widest == min(width, 7 + 20 + 5)  # label, bar (its full 20 cells where they fit), weight


def test_focus_view_ignores_future_positions_and_labels_each_head():
    out = render(focus_view(stack(2, 2, 6), "abcdef", 1, top=5))
    for label in ("L0 H0", "L0 H1", "L1 H0", "L1 H1"):
        assert label in out
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == 4 * 2


def test_grid_and_focus_views_number_positions_from_the_offset():
    grid = render(grid_view(stack(1, 1, 90), "z" * 90, color=False, offset=100))
    assert re.search(r"showing positions \d+:190 of 100:190", grid)
    focus = render(focus_view(stack(1, 1, 4), "abcd", 3, top=1, offset=100))
    assert "attention from position 103 d" in focus
    assert re.search(r"^  [abcd]  10[0-3] ", focus, re.M), focus


# -- attention_views: summary, lens, generated, export ------------------------------------------

def head(layer: int, h: int, label: str, **scores: float) -> HeadPattern:
    full = {name: scores.get(name, 0.0) for name in PATTERNS}
    return HeadPattern(layer, h, full, scores.get("entropy", 0.1), label)


def test_summary_lists_every_head_with_its_label_on_prompt_and_probe():
    prompt = [head(0, 0, "previous", previous=0.93), head(1, 0, "first", first=0.71)]
    probe = [head(0, 0, "previous", previous=0.95), head(1, 0, "induction", induction=0.62)]
    out = render(summary_view(prompt, probe, "to be", 15, 0.4, color=False))
    assert all(cell_len(line) <= 80 for line in out.splitlines())
    rows = [line.split() for line in out.splitlines() if line.startswith("L")]
    assert [r[:3] for r in rows] == [["L0", "H0", "previous"], ["L1", "H0", "first"],
                                     ["L0", "H0", "previous"], ["L1", "H0", "induction"]]
    assert rows[0][3] == "0.93" and rows[3][7] == "0.62"  # scores sit under their pattern's column
    assert "to␣be" in out and "15 random characters" in out and "0.40" in out


def test_summary_shows_a_dash_for_a_pattern_that_never_applies():
    heads = [head(0, 0, "current", current=1.0, duplicate=float("nan"))]
    out = render(summary_view(heads, heads, "abc", 3, 0.4, color=False))
    assert "  –  " in out and "nan" not in out


def test_lens_lists_guesses_per_stage_with_the_actual_next_char():
    lens = Lens(1, ["embed", "L0"], [[("a", 0.5), ("中", 0.3)], [("中", 0.9), ("a", 0.05)]], "中", [0.3, 0.9])
    out = render(lens_view(lens, "x中y", offset=10, color=False))
    assert "logit lens at position 11 中 (next in the prompt: 中)" in out
    rows = [line for line in out.splitlines() if line.split()[0] in ("embed", "L0")]
    assert rows[0].split() == ["embed", "a", "0.50", "中", "0.30", "0.30"]
    assert rows[1].split() == ["L0", "中", "0.90", "a", "0.05", "0.90"]
    assert len({cell_len(r) for r in rows}) == 1  # a wide glyph takes the same two cells as a narrow one


def test_generated_view_ranks_the_earlier_chars_each_step_attended_to():
    steps = [GeneratedStep(3, "d", 0.62, 0, np.array([0.1, 0.7, 0.2])),
             GeneratedStep(4, "世", 0.05, 1, np.array([0.5, 0.25, 0.25]))]
    gen = Generation("ab dd世"[:2] + "c" + "d世", 3, steps)
    out = render(generated_view(gen, [s.weights for s in steps], "layer 0, mean over heads", color=False))
    assert "text: abc│d世" in out and "layer 0, mean over heads" in out
    rows = [line for line in out.splitlines() if line[:1].isdigit()]
    assert rows[0].split()[:5] == ["3", "d", "0.62", "b", "1"] and rows[0].split()[5] == "0.70"
    assert rows[1].split()[:5] == ["4", "世", "0.05", "b", "1"]  # keys start at keys_from
    assert rows[1].split()[6:8] == ["d", "3"]  # equal weights: the more recent key first
    assert "not why" in out


@pytest.mark.parametrize("width, label", [(80, "most-attended earlier characters (position, weight)"),
                                          (50, "most-attended (position, weight)"), (30, "most-attended")])
def test_generated_view_shortens_its_column_header_to_fit_rather_than_cutting_it(width, label):
    steps = [GeneratedStep(3, "d", 0.62, 0, np.array([0.1, 0.7, 0.2]))]
    out = render(generated_view(Generation("abcd", 3, steps), [steps[0].weights], "all layers", color=False,
                                max_width=width), width=width)
    header = next(line for line in out.splitlines() if line.lstrip().startswith("pos"))
    assert header.split("p  ", 1)[1].strip() == label and cell_len(header) <= width


def test_export_writes_a_valid_svg_and_an_html_page_with_the_prompt(tmp_path):
    view = head_view(causal(6), "héllo!", title="layer 0, head 0", color=False)
    export(view, tmp_path / "a.svg", width=80, title="tfcli")
    root = ElementTree.parse(tmp_path / "a.svg").getroot()
    assert root.tag.endswith("svg")
    assert "layer" in "".join(root.itertext())
    export(view, tmp_path / "a.html", width=80, title="tfcli")
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert "<html" in page and "layer 0, head 0" in page and "é" in page


def test_generated_view_keeps_the_end_of_a_long_prompt_on_one_line():
    prompt = "x" * 200 + "end"
    steps = [GeneratedStep(203, "!", 0.5, 171, np.full(32, 1 / 32))]
    out = render(generated_view(Generation(prompt + "!", 203, steps), [s.weights for s in steps], "all layers"))
    first = out.splitlines()[0]
    assert first.startswith("text: …x") and first.endswith("end│!") and cell_len(first) <= 80


# -- content on a fixed-width console, alignment, valid exports --------------------------------

MIXED = "a中😀\u0301\x01 é\tＡz"  # narrow, CJK, emoji, a bare combining mark, a control char, fullwidth


def test_grid_panels_draw_each_heads_weights_where_they_are():
    t = 6
    w = np.zeros((1, 2, t, t))
    w[0, 0] = np.eye(t)  # head 0: each query on itself
    w[0, 1, :, 0] = 1.0  # head 1: every query on the first key
    lines = render(grid_view(w, "abcdef", color=False)).splitlines()
    assert lines[0] == "text: abcdef" and lines[1].split() == ["L0", "H0", "L0", "H1"]
    width = max(t, len("L0 H0"))  # a panel is as wide as its keys or its label; then a 2-column gap
    for i, row in enumerate(lines[2:2 + t]):
        current, first = row[:t], row[width + 2:width + 2 + t]
        assert current == " " * i + "█" + MASKED * (t - 1 - i), row
        assert first == "█" + " " * i + MASKED * (t - 1 - i), row


def test_head_view_columns_stay_aligned_with_wide_combining_and_control_characters():
    out = render(head_view(causal(len(MIXED)), MIXED, color=False))
    header, rows = body(out, len(MIXED))
    assert len({cell_len(row) for row in rows}) == 1 and cell_len(header) == cell_len(rows[0])
    glyphs = [visible(c) for c in MIXED]
    assert [row.split()[1] for row in rows] == glyphs
    label = cell_len(rows[0]) - 2 * len(MIXED)
    starts, i = [], 0
    for g in glyphs:  # the terminal column each header glyph starts at
        i = header.index(g, i)
        starts.append(cell_len(header[:i]))
        i += len(g)
    assert starts == [label + 2 * j for j in range(len(MIXED))], header


def test_right_to_left_letters_in_the_header_each_keep_their_column():
    text = "مرحبا שלום"
    header, rows = body(render(head_view(causal(len(text)), text, color=False)), len(text))
    assert cell_len(header) == cell_len(rows[0])
    for c in "مرحباשלום":  # each followed by a left-to-right mark, so bidi cannot reverse the run
        assert header.count(c + " \u200e") == 1
    assert "a\u200e" not in render(head_view(causal(3), "abc", color=False))  # (left-to-right text is as it was)


def test_focus_view_bars_stay_aligned_with_wide_combining_and_control_characters():
    t = len(MIXED)
    out = render(focus_view(stack(1, 1, t), MIXED, t - 1, top=t, color=False))
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert sorted(row.split()[0] for row in rows) == sorted(visible(c) for c in MIXED)
    assert len({cell_len(row) for row in rows}) == 1
    bar_starts = {cell_len(re.match(r"  \S+ +\d+ ", row)[0]) for row in rows}  # after "  glyph position "
    assert len(bar_starts) == 1, out


class StrictHTML(HTMLParser):
    """Fails on a closing tag that does not close the innermost open element; collects the text."""

    VOID = {"meta", "link", "br", "img", "hr", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.seen: list[str] = []
        self.text = ""
        self.doctype = ""

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.seen.append(tag)
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text += data


def views(chars: str) -> dict:
    t = len(chars)
    lens = Lens(1, ["embed", "L0"], [[("a", 0.5)], [("中", 0.9)]], chars[2], [0.1, 0.2])
    pattern = [head(0, 0, "previous", previous=0.9)]
    gen = Generation(chars, 2, [GeneratedStep(j, chars[j], 0.5, 0, np.full(j, 1 / j)) for j in range(2, t)])
    return {
        "head": head_view(causal(t), chars, title="layer 0, head 0"),
        "grid": grid_view(stack(2, 2, t), chars),
        "focus": focus_view(stack(2, 2, t), chars, t - 1),
        "summary": summary_view(pattern, pattern, chars, 3, 0.4),
        "lens": lens_view(lens, chars),
        "generated": generated_view(gen, [s.weights for s in gen.steps], "all layers"),
    }


@pytest.mark.parametrize("name", ["head", "grid", "focus", "summary", "lens", "generated"])
def test_every_view_exports_as_valid_svg_and_html_with_its_characters(tmp_path, name):
    chars = "ab中 é<&"
    view = views(chars)[name]
    title = "tfcli: a<b & \x01\n"  # a prompt's raw characters, as the CLI passes them
    export(view, tmp_path / "v.svg", width=80, title=title)
    svg = ElementTree.parse(tmp_path / "v.svg").getroot()
    assert svg.tag.endswith("svg")
    assert "中" in "".join(svg.itertext()).replace("\xa0", " ")
    export(view, tmp_path / "v.html", width=80, title=title)
    page = StrictHTML()
    page.feed((tmp_path / "v.html").read_text(encoding="utf-8"))
    page.close()
    assert page.doctype.lower() == "doctype html" and page.open == []
    assert page.seen[:2] == ["html", "head"] and "title" in page.seen and "body" in page.seen
    assert "中" in page.text and "tfcli: a<b & ␁⏎" in page.text  # escaped in the file, characters in the page


def test_positions_shown_is_what_the_head_and_grid_views_draw_whatever_the_label_digits():
    from tfcli.render.heatmap import positions_shown

    for width in (40, 80, 212, 300):
        n = positions_shown("head", 0, 4, width)
        out = render(head_view(causal(n), "x" * n, max_width=width), width=width)
        assert "showing positions" not in out, width
        wider = render(head_view(causal(n + 1), "x" * (n + 1), max_width=width), width=width)
        assert "showing positions" in wider, width  # and not one position fewer than fits
    n = positions_shown("grid", 3, 4, 80)
    assert "showing positions" not in render(grid_view(stack(1, 4, n), "x" * n, layer_labels=[3]))
    assert "showing positions" in render(grid_view(stack(1, 4, n + 1), "x" * (n + 1), layer_labels=[3]))
    assert positions_shown("focus", 0, 4, 80) is None


def test_a_hindi_header_and_rows_keep_their_columns_on_a_terminal():
    import unicodedata

    def on_a_terminal(line: str) -> int:  # (wcwidth gives a spacing mark a cell; rich gives it none)
        return cell_len(line) + sum(unicodedata.category(c) == "Mc" for c in line)

    text = "हिंदी भारत की"  # (ि ी ा: spacing marks, 0 cells to rich and 1 to a terminal)
    n = len(text)
    w = np.tril(np.ones((n, n)))
    console = Console(file=io.StringIO(), width=32, color_system=None)
    console.print(head_view(w / w.sum(-1, keepdims=True), text, color=False, max_width=32))
    lines = console.file.getvalue().splitlines()[:n + 1]  # the header, then a row per character
    assert len({on_a_terminal(line) for line in lines}) == 1
