"""The interactive session (`tfcli sample --interactive`), driven by scripted lines.

A `Session` takes lines from any iterable and reports through one callback, so these tests need no
terminal: they record every write and compare the text with what `tfcli.generate` gives.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEXT, make_model
from typer.testing import CliRunner

from tfcli.checkpoint import load_model, save_model
from tfcli.cli import app
from tfcli.config import SampleConfig
from tfcli.corpus import Vocab, show_char
from tfcli.repl import COMMANDS, SETTINGS, Session
from tfcli.sampling import generate

GREEDY = SampleConfig(max_new_tokens=12, temperature=0.0)


class Recorder:
    """A session's write callback that keeps every (kind, text)."""

    def __init__(self, interrupt_after: int | None = None):
        self.writes: list[tuple[str, str]] = []
        self.interrupt_after = interrupt_after

    def __call__(self, kind: str, text: str, logprob: float | None = None) -> None:
        self.writes.append((kind, text))
        if kind == "generated" and self.interrupt_after is not None and len(self.of("generated")) == \
                self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of a continuation

    def of(self, kind: str) -> list[str]:
        return [text for k, text in self.writes if k == kind]


def session(model, lines: list[str], cfg: SampleConfig = GREEDY, prompt: str = "hello", seed: int = 0,
            out: Recorder | None = None) -> tuple[Session, Recorder]:
    out = out or Recorder()
    s = Session(model, cfg, out, prompt, seed=seed)
    s.run(lines)
    return s, out


def greedy(model, text: str, n: int = GREEDY.max_new_tokens) -> str:
    cfg = SampleConfig(max_new_tokens=n, temperature=0.0, seed=1)
    return "".join(p[0] for p in generate(model, model.vocab, text, cfg))


def test_greedy_session_continues_exactly_as_generate_does_past_the_context(model):
    s, out = session(model, ["wor", ""])
    expected = "hello" + greedy(model, "hello")
    expected += "wor\n" + greedy(model, expected + "wor\n")
    expected += greedy(model, expected)  # the empty line: nothing added, the model goes on
    assert len(expected) > model.config.block_size  # later continuations start past the context
    assert s.text == expected
    assert "".join(out.of("prompt") + out.of("typed")) == "hello" + "wor\n"
    assert "".join(text for kind, text in out.writes if kind in ("prompt", "typed", "generated")) == expected


def test_temp_zero_switches_a_sampling_session_to_greedy(model):
    s, _ = session(model, ["/temp 0", "he"], cfg=SampleConfig(max_new_tokens=10, temperature=1.5), seed=3)
    before = s.undo_stack[-1]  # the text just before the last continuation
    assert s.cfg.temperature == 0.0
    assert s.text == before + greedy(model, before, 10)


def test_a_seed_replays_the_session_and_another_seed_does_not(model):
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0)
    a, b = (session(model, ["wo", ""], cfg=cfg, seed=5)[0].text for _ in range(2))
    c = session(model, ["wo", ""], cfg=cfg, seed=6)[0].text
    assert a == b != c


def test_seed_command_restarts_the_random_numbers(model):
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0)
    s, _ = session(model, ["/seed 9", "/reset", ""], cfg=cfg, seed=5)
    assert s.text == session(model, [], cfg=cfg, seed=9)[0].text


def test_seed_minus_one_draws_a_random_seed_and_says_which(model):
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0)
    seeds = []
    for _ in range(2):
        s, out = session(model, ["/seed -1"], cfg=cfg, seed=5)
        seeds.append(s.seed)
        assert s.seed != -1 and f"seed {s.seed}" in out.of("info")
    assert seeds[0] != seeds[1]


def test_trailing_backslash_joins_without_newline_and_double_slash_types_a_slash():
    model = make_model(Vocab.from_text(TEXT + "/"))
    s, out = session(model, ["wor\\", "ld", "//he"], cfg=SampleConfig(max_new_tokens=0))
    assert s.text == "hello" + "wor" + "ld\n" + "/he\n"
    assert not out.of("error")


def test_top_lists_the_likeliest_next_characters_with_the_models_probabilities(model):
    s, _ = session(model, [], cfg=SampleConfig(max_new_tokens=0, temperature=0.0))
    rows = s.top(5)
    probs = [p for _, p, _ in rows]
    assert len(rows) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(model.vocab.encode("hello").astype("int64"))[None])
    reference = logits[0, -1].softmax(-1)
    for char, p, _ in rows:
        assert p == pytest.approx(float(reference[model.vocab.chars.index(char)]), abs=1e-5)
    # greedy sampling puts all its probability on the likeliest character, the one it then writes
    assert [q for _, _, q in rows] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert rows[0][0] == greedy(model, "hello", 1)
    everything = s.top(len(model.vocab))
    assert sum(p for _, p, _ in everything) == pytest.approx(1.0, abs=1e-5)


def test_top_with_filters_shows_what_sampling_can_still_draw(model):
    s, _ = session(model, ["/top-k 2"], cfg=SampleConfig(max_new_tokens=0, temperature=1.0))
    sampled = [q for _, _, q in s.top(len(model.vocab))]
    assert sum(q > 0 for q in sampled) == 2 and sum(sampled) == pytest.approx(1.0, abs=1e-5)


def test_top_command_shows_a_row_per_character_with_visible_whitespace(model):
    s, out = session(model, ["/top 4"], cfg=SampleConfig(max_new_tokens=0))
    listing = out.of("listing")[-1].splitlines()
    assert len(listing) == 1 + 4
    for (char, p, _), line in zip(s.top(4), listing[1:]):
        assert line.split()[0] == show_char(char) and f"{p:.3f}" in line


def test_undo_drops_the_continuation_then_the_typed_text(model):
    s, out = session(model, ["wo"])
    first = "hello" + greedy(model, "hello")
    assert s.text.startswith(first + "wo\n") and len(s.text) > len(first + "wo\n")
    for expected in (first + "wo\n", first, "hello"):
        s.feed("/undo")
        assert s.text == expected
    s.feed("/undo")
    assert s.text == "hello" and out.of("error") == ["nothing to undo"]


def test_reset_goes_back_to_the_prompt_and_undo_brings_the_text_back(model):
    s, _ = session(model, ["wo"])
    text = s.text
    s.feed("/reset")
    assert s.text == "hello"
    s.feed("/undo")
    assert s.text == text


def test_show_prints_the_whole_text(model):
    s, out = session(model, ["wo", "/show"])
    assert out.of("listing")[-1].rstrip("\n") == s.text.rstrip("\n")


def test_ctrl_c_stops_the_continuation_keeps_what_came_and_the_session_goes_on(model):
    out = Recorder(interrupt_after=3)
    s, _ = session(model, ["he"], out=out)
    first = "hello" + greedy(model, "hello", 3)
    assert out.of("info") == ["stopped"]
    assert s.text.startswith(first + "he\n")
    assert s.text == first + "he\n" + greedy(model, first + "he\n")


def test_stop_string_ends_a_continuation_and_stays_in_the_text(model):
    full = greedy(model, "hello", 30)
    stop = full[5]
    s, _ = session(model, [], cfg=SampleConfig(max_new_tokens=30, temperature=0.0, stop=(stop,)))
    assert s.text == "hello" + full[:full.index(stop) + 1]


def test_unknown_characters_are_refused_in_one_line_and_the_session_goes_on(model):
    s, out = session(model, ["heZZo", "he"], cfg=SampleConfig(max_new_tokens=0))
    assert s.text == "hello" + "he\n"
    [error] = out.of("error")
    assert "Z" in error and "\n" not in error


@pytest.mark.parametrize("line", ["/temp abc", "/temp -1", "/top-k -1", "/top-p 2", "/n -3", "/top 0", "/top x",
                                  "/frobnicate", "/", "/undo now", "/n 1 2", "/seed x", f"/seed {10**20}"])
def test_bad_command_gives_one_line_error_and_the_session_goes_on(model, line):
    s, out = session(model, [line, "he"], cfg=SampleConfig(max_new_tokens=4, temperature=0.0))
    [error] = out.of("error")
    assert error and "\n" not in error
    assert s.cfg.temperature == 0.0 and s.cfg.top_k is None and s.cfg.max_new_tokens == 4
    assert "he\n" in s.text and len(out.of("generated")) == 8
    assert "--" not in error  # a REPL error names its command, not the command line's flag


@pytest.mark.parametrize("line, named", [("/temp -1", "/temp"), ("/top-k -1", "/top-k"), ("/n -3", "/n"),
                                         ("/repeat-penalty 0", "/repeat-penalty")])
def test_setting_errors_name_the_command_typed(model, line, named):
    _, out = session(model, [line], cfg=SampleConfig(max_new_tokens=0))
    [error] = out.of("error")
    assert error.startswith(named + " must"), error


def test_settings_change_show_and_switch_off(model):
    s, out = session(model, ["/top-k 3", "/top-p 0.9", "/min-p 0.05", "/n 7", "/repeat-penalty 1.1", "/top-k off",
                             "/temp"], cfg=SampleConfig(max_new_tokens=0))
    assert (s.cfg.top_k, s.cfg.top_p, s.cfg.min_p, s.cfg.max_new_tokens, s.cfg.repeat_penalty) == \
        (None, 0.9, 0.05, 7, 1.1)
    assert out.of("info")[-1] == f"temp {s.cfg.temperature}"


def test_top_k_zero_switches_it_off_as_in_llama_cpp(model):
    s, out = session(model, ["/top-k 3", "/top-k 0"], cfg=SampleConfig(max_new_tokens=0))
    assert s.cfg.top_k is None and out.of("info")[-1] == "top-k off"


def test_help_names_every_command(model):
    _, out = session(model, ["/help"], cfg=SampleConfig(max_new_tokens=0))
    for name in [*SETTINGS, *COMMANDS, "quit"]:
        assert f"/{name}" in out.of("listing")[0]
    assert "top-k off" in out.of("listing")[0] and "None" not in out.of("listing")[0]


def test_quit_ends_the_session_and_end_of_input_does_too(model):
    s, _ = session(model, ["/quit", "more"], cfg=SampleConfig(max_new_tokens=0))
    assert s.text == "hello"
    s, _ = session(model, iter([]), cfg=SampleConfig(max_new_tokens=0))
    assert s.text == "hello"


# -- through the CLI, with lines piped to stdin -------------------------------------------------

@pytest.fixture
def saved(model, tmp_path) -> str:
    path = tmp_path / "model.safetensors"
    save_model(path, model, model.vocab, {})
    return str(path)


def sample(*args: str, input: str):
    return CliRunner().invoke(app, ["sample", *args], input=input)


def test_cli_interactive_in_a_pipe_prints_the_whole_text_and_nothing_else(saved):
    result = sample("-m", saved, "-p", "hello", "-n", "12", "--temp", "0", "-i", input="wor\n\n")
    assert result.exit_code == 0, result.output
    model = load_model(saved)
    expected = "hello" + greedy(model, "hello")
    expected += "wor\n" + greedy(model, expected + "wor\n")
    expected += greedy(model, expected)
    assert result.stdout == expected + ("" if expected.endswith("\n") else "\n")
    assert "Traceback" not in result.output and "\x1b[" not in result.output


def test_cli_interactive_reads_lines_piped_from_a_windows_file_as_their_text(saved):
    import subprocess
    import sys

    def run(lines: bytes) -> bytes:
        args = ["-m", "tfcli", "sample", "-m", saved, "-p", "hello", "-n", "12", "--temp", "0", "-i"]
        done = subprocess.run([sys.executable, *args], input=lines, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout
    assert run(b"wor\r\n\r\nlo \\\r\nhe\r\n") == run(b"wor\n\nlo \\\nhe\n")  # (CliRunner's stdin translates)


def test_cli_interactive_starts_with_what_sample_prints_for_the_same_seed(saved):
    args = ("-m", saved, "-p", "hello", "-n", "40", "--seed", "11")
    plain = CliRunner().invoke(app, ["sample", *args])
    interactive = sample(*args, "-i", input="")
    assert plain.exit_code == interactive.exit_code == 0
    assert interactive.stdout == plain.stdout


def test_cli_interactive_keeps_going_after_an_unknown_character_and_a_bad_command(saved):
    result = sample("-m", saved, "-p", "hello", "-n", "0", "-i", input="heZZo\n/temp hot\nhe\n/top 3\n")
    assert result.exit_code == 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "Z" in errors[0] and "--unknown" in errors[0] and "/temp" in errors[1]
    assert result.stdout.startswith("hello" + "he\n") and "model" in result.stdout


def test_cli_interactive_applies_unknown_replace_to_typed_text(saved):
    result = sample("-m", saved, "-p", "hello", "-n", "0", "-i", "--unknown", "replace", input="WORLD\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello" + "world\n" and "W→w" in result.stderr


@pytest.mark.parametrize("flags, word", [(["--num-samples", "2"], "--num-samples"), (["--json"], "--json"),
                                         (["--no-stream"], "--no-stream"), (["-p", "-"], "stdin"),
                                         (["--prompt-file", "-"], "stdin")])
def test_cli_interactive_refuses_what_cannot_go_with_it(saved, flags, word):
    result = sample("-m", saved, "-i", *flags, input="")
    assert result.exit_code == 2, result.output
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert word in error and "--interactive" in error


def test_a_remark_starts_its_own_line_on_a_terminal_even_with_stdin_piped(monkeypatch):
    import io

    from conftest import use_consoles
    from rich.console import Console

    from tfcli.commands import sample
    screen, remarks = io.StringIO(), io.StringIO()
    use_consoles(monkeypatch, Console(file=screen, force_terminal=True, no_color=True),
                 Console(file=remarks, force_terminal=True, no_color=True))
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    out = sample.ReplOutput(color_by_prob=False)
    out("generated", "and so")
    out("info", "undone: 27 → 7 characters", None)
    assert screen.getvalue() == "and so\n" and "undone" in remarks.getvalue()
    use_consoles(monkeypatch, Console(file=io.StringIO(), force_terminal=False))  # a pipe: the text as made
    piped = sample.ReplOutput(color_by_prob=False)
    piped("generated", "and so")
    piped("info", "stopped", None)
    assert sample.stdout.file.getvalue() == "and so"
