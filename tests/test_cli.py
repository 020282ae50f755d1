"""The `tfcli` command end to end, through typer's CliRunner.

One tiny model is trained once per module (2 layers, 32 wide, 30 steps on made-up names)
and every other command runs against it. Bad input must give exit code 2 (usage) or 1
(runtime) and one line on stderr that names the problem, never a traceback.
"""

from __future__ import annotations

import codecs
import errno
import io
import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import typer
from conftest import use_consoles
from rich.cells import cell_len
from typer.testing import CliRunner

from tfcli.cli import app
from tfcli.commands import common
from tfcli.commands.common import QuietConsole
from tfcli.config import SampleConfig

NAMES = ["anna", "bob", "carla", "dave", "eve", "frank", "gina", "hugo", "ines", "jack", "kara", "liam"]
TINY = ["--preset", "tiny", "--max-steps", "30"]
ANSI = "\x1b["


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def ok(*args: str, **kwargs):
    result = invoke(*args, **kwargs)
    assert result.exit_code == 0, result.output
    assert ANSI not in result.output
    return result


def refused(code: int, *args: str, **kwargs) -> str:
    """Run a command that must fail; return its one-line error message (lowercased)."""
    result = invoke(*args, **kwargs)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0].lower()


def write_names(path: Path, lines: int = 300) -> Path:
    rng = random.Random(0)
    path.write_text("\n".join(f"{rng.choice(NAMES)} {rng.choice(NAMES)}" for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and far faster than on two when the CPUs are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A directory holding names.txt and runs/names, the one run every read-only test uses."""
    root = tmp_path_factory.mktemp("trained")
    write_names(root / "names.txt")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        ok("train", "names.txt", *TINY)
    assert (root / "runs" / "names" / "model.safetensors").is_file()
    return root


@pytest.fixture
def in_trained(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained)
    return trained


@pytest.fixture
def model(trained) -> Path:
    return trained / "runs" / "names"


# -- help and startup -------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--help"], ["-h"], ["train", "--help"], ["sample", "-h"], ["eval", "--help"]])
def test_help_does_not_import_torch(args):
    code = ("import sys; from typer.testing import CliRunner; from tfcli.cli import app; "
            f"r = CliRunner().invoke(app, {args!r}); assert r.exit_code == 0, r.output; "
            "assert 'Usage' in r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_piped_is_plain_text_without_boxes():
    env = {k: v for k, v in os.environ.items() if k != "TYPER_USE_RICH"}
    out = subprocess.run([sys.executable, "-m", "tfcli", "sample", "--help"], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert out.startswith("Usage: ") and "tfcli sample [OPTIONS]" in out.splitlines()[0] and "--top-p" in out
    assert not set("╭│╰─") & set(out) and ANSI not in out
    assert "[default: random" in out and "\\[" not in out  # (rich's escape, which plain text does not need)


def test_the_library_s_errors_are_there_after_a_bare_import():
    code = ("import tfcli; "
            "print(tfcli.errors.UsageError is tfcli.UsageError, issubclass(tfcli.UsageError, tfcli.TfcliError))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]


def test_the_library_s_lazy_names_are_listed_for_dir_help_and_completion():
    code = "import sys, tfcli; names = dir(tfcli); print('torch' in sys.modules); print(' '.join(names))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded, names = out.splitlines()
    assert loaded == "False"  # (listing them imports nothing)
    assert {"train", "load", "generate", "preset", "evaluate", "Step", "Done", "UsageError"} <= set(names.split())


def test_version_needs_no_command():
    from importlib.metadata import version
    result = ok("--version")
    assert result.stdout == f"tfcli {version('tfcli')}\n"


def test_an_interrupt_that_arrives_wrapped_is_an_interruption(capsys):
    from tfcli.commands.common import handle_errors

    @handle_errors(torch=False)
    def command():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # (as Python 3.11 wraps one raised in a class's __set_name__)
            raise RuntimeError("Error calling __set_name__ on 'cached_property' instance") from e
    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == 130 and "interrupted: the command stopped" in capsys.readouterr().err


def test_an_argument_an_ascii_locale_mangled_is_read_as_the_utf_8_it_was_typed_in():
    from tfcli.commands.common import from_argv
    from tfcli.errors import UsageError

    assert from_argv("caf\udcc3\udca9", "--prompt") == "café"  # (LC_ALL=C without UTF-8 mode)
    assert from_argv("café", "--prompt") == "café"
    with pytest.raises(UsageError, match="--stop is not valid UTF-8"):
        from_argv("caf\udce9", "--stop")  # (Latin-1 bytes)


def test_under_torchrun_a_peer_gone_from_a_collective_is_one_plain_line(monkeypatch, capsys):
    from tfcli.commands.common import handle_errors

    @handle_errors(torch=False)
    def command():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                           "[127.0.0.1]:56479. This is typically caused by a remote worker crashing.")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == 1
    assert capsys.readouterr().err.strip() == ("error: rank 1: another process of this torchrun job has ended "
                                               "(its error, if it met one, is above)")


def test_no_arguments_shows_usage():
    result = invoke()
    assert result.exit_code == 2 and "Usage" in result.output and "train" in result.output


# -- train ------------------------------------------------------------------------------------

def test_train_writes_run_named_after_corpus_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_names(tmp_path / "names.txt", 100)
    first = ok("train", "names.txt", "--preset", "tiny", "--max-steps", "5")
    assert (tmp_path / "runs/names/model.safetensors").is_file()
    assert "corpus: names.txt" in first.stdout and "done: 5 steps" in first.stdout
    before = (tmp_path / "runs/names/model.safetensors").read_bytes()
    ok("train", "names.txt", "--preset", "tiny", "--max-steps", "5")
    assert (tmp_path / "runs/names-2/model.safetensors").is_file()
    assert (tmp_path / "runs/names/model.safetensors").read_bytes() == before


def test_train_output_in_a_pipe_is_plain_lines(trained, tmp_path):
    result = ok("train", trained / "names.txt", "--preset", "tiny", "--max-steps", "3", "--out", tmp_path / "r")
    assert result.stdout.startswith("corpus: ")
    assert "step " in result.stdout and "\r" not in result.stdout


def test_train_on_a_dumb_terminal_logs_plain_lines(trained, tmp_path, monkeypatch):
    """TERM=dumb (Emacs' shell, some IDE consoles) redraws nothing: a dashboard stayed blank till the end."""
    monkeypatch.setenv("TERM", "dumb")
    screen = io.StringIO()
    use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, width=80))
    ok("train", trained / "names.txt", "--preset", "tiny", "--max-steps", "3", "--out", tmp_path / "r")
    lines = screen.getvalue().splitlines()
    assert lines[0].startswith("corpus: ") and any(line.startswith("step      1  loss") for line in lines)


def test_train_with_a_validation_file_says_how_much_each_file_holds(tmp_path):
    write_names(tmp_path / "train.txt", 80)
    (tmp_path / "val.txt").write_text("anna bob\n" * 10)
    result = ok("train", tmp_path / "train.txt", "--val", tmp_path / "val.txt", "--preset", "tiny", "--max-steps",
                "2", "--out", tmp_path / "r")
    train_chars = len((tmp_path / "train.txt").read_text())
    assert f"train.txt: {train_chars:,} chars to train on; validation: {tmp_path / 'val.txt'}: 90 chars" \
        in result.stdout


def test_train_on_a_directory_reads_its_text_files(tmp_path):
    (tmp_path / "data").mkdir()
    write_names(tmp_path / "data" / "a.txt", 60)
    write_names(tmp_path / "data" / "b.txt", 60)
    result = ok("train", tmp_path / "data", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r")
    both = len((tmp_path / "data/a.txt").read_text()) + len((tmp_path / "data/b.txt").read_text())
    assert f"{both:,} chars" in result.stdout
    assert (tmp_path / "r/model.safetensors").is_file()


def test_train_resume_continues_the_step_count(trained, tmp_path):
    out = tmp_path / "r"
    ok("train", trained / "names.txt", "--preset", "tiny", "--max-steps", "3", "--out", out)
    ok("train", trained / "names.txt", "--max-steps", "6", "--out", out, "--resume")
    info = json.loads(ok("info", "-m", out, "--json").stdout)
    assert info["summary"]["step"] == 6


def test_train_ends_after_epochs_and_a_resume_goes_on_to_the_limits_given_then(trained, tmp_path):
    out, corpus = tmp_path / "r", trained / "names.txt"
    first = ok("train", corpus, "--preset", "tiny", "--epochs", "0.5", "--out", out)
    assert "0.5 epochs" in first.stdout and "(reached its epoch limit)" in first.stdout  # no default time budget either
    ended = json.loads(ok("info", "-m", out, "--json").stdout)["summary"]["step"]
    ok("train", corpus, "--max-steps", str(ended + 2), "--out", out, "--resume")  # the old epochs no longer stop it
    assert json.loads(ok("info", "-m", out, "--json").stdout)["summary"]["step"] == ended + 2


def test_train_gives_auto_the_users_dropout_which_decides_the_epoch_limit(tmp_path, monkeypatch):
    from tfcli import native, trainer
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: True)  # (the passes of a bf16 CPU's 3.2M model)
    corpus = write_names(tmp_path / "names.txt", lines=30_000)  # ~330K characters: ~8 passes in 5 minutes
    settings = []

    def configs_only(data, model_cfg, train_cfg, *args, **kwargs):
        settings.append((model_cfg.dropout, train_cfg.epochs))
        chars.append(len(data.train))
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", configs_only)
    chars = []
    for flags in ([], ["--dropout", "0.1"], ["--dropout", "0"], ["--dropout", "0", "--epochs", "7"],
                  ["--dropout", "0", "--batch-size", "128"]):
        assert invoke("train", corpus, "--out", tmp_path / "r", *flags).exit_code == 130
    # auto's dropout and 10 passes; the user's dropout, still 10; none: 4 passes, or the user's 7
    assert settings[:4] == [(0.2, 10.0), (0.1, 10.0), (0.0, 4.0), (0.0, 7.0)]
    assert settings[4][1] * chars[4] == pytest.approx(200 * 128 * 256)  # (4 passes of 128 rows: under 200 steps)


@pytest.mark.parametrize("native_bf16, flags, width", [(True, [], 256), (True, ["--dtype", "float32"], 128),
                                                      (False, [], 128), (False, ["--dtype", "bfloat16"], 128),
                                                      (True, ["--dtype", "bfloat16"], 256)])
def test_train_picks_its_model_for_the_precision_the_cpu_trains_in(tmp_path, monkeypatch, native_bf16, flags, width):
    # 5 minutes in float32 train the 0.8M model, in bf16 the 3.2M one
    from tfcli import native, trainer
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: native_bf16)
    corpus = write_names(tmp_path / "names.txt", lines=3000)
    seen = []

    def configs_only(data, model_cfg, train_cfg, *args, **kwargs):
        seen.append(model_cfg.n_embd)
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer, "train", configs_only)
    assert invoke("train", corpus, "--out", tmp_path / "r", "--device", "cpu", *flags).exit_code == 130
    assert seen == [width]


def test_a_step_too_big_for_this_machines_memory_is_refused_before_anything_is_written(tmp_path):
    """On Linux the OOM killer ended such a run in its first step, saying only "Killed"."""
    from tfcli.memory import free_bytes
    if free_bytes() is None:
        pytest.skip("this system does not say how much memory is free")
    corpus = write_names(tmp_path / "names.txt")
    huge = ["--n-layer", "1", "--n-embd", "32", "--block-size", "16", "--max-steps", "1", "--out", tmp_path / "r"]
    message = refused(2, "train", corpus, *huge, "--batch-size", str(10**8))  # (terabytes of activations)
    assert re.fullmatch(r"error: a training step of 100,000,000 sequences of 16 characters needs at least "
                        r"[\d,.]+ gib of memory, and [\d,.]+ gib is free here; --grad-accum \d+ takes the same step "
                        r"in \d+ parts, or use a smaller --batch-size", message)
    assert not (tmp_path / "r").exists()


def test_a_run_ended_by_autos_epoch_limit_says_so_and_how_to_lift_it(tmp_path):
    corpus = write_names(tmp_path / "names.txt", lines=400)  # ~3.6K characters to train on: 4 passes, ~225 steps
    small = ["--n-layer", "3", "--n-head", "1", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--no-compile", "--time", "600"]  # (a budget only a stalled host would reach; 9K hidden weights)
    ended = ok("train", corpus, *small, "--dropout", "0", "--out", tmp_path / "r")
    assert "(reached its epoch limit)" in ended.stdout
    assert ("note: it stopped at auto's limit of 4 passes over the text, after which a model without dropout learns "
            "it by heart; --epochs N sets another") in ended.stderr
    assert "note: it stopped" not in ok("train", corpus, *small, "--epochs", "1", "--out", tmp_path / "r2").stderr
    one_layer = ok("train", corpus, *small, "--n-layer", "1", "--dropout", "0", "--out", tmp_path / "r3")
    assert "limit of 6 passes" in one_layer.stderr  # 3K hidden weights: over half a character each


def test_autos_limit_is_explained_by_which_limit_it_was():
    from tfcli.commands.train import auto_limit
    assert auto_limit(4.0, 0.0).startswith("it stopped at auto's limit of 4 passes over the text, after which")
    assert auto_limit(6.0, 0.0).endswith("6 passes over the text, after which a model this size gained little on a "
                                         "text this long")
    assert auto_limit(10.0, 0.2) == "it stopped at auto's limit of 10 passes over this small text"
    short = "passes over this short text (at least 200 steps)"
    assert auto_limit(409.6, 0.2) == f"it stopped at auto's limit of 410 {short}"
    assert auto_limit(6.5, 0.0) == f"it stopped at auto's limit of 6.5 {short}"
    assert auto_limit(9102.4, 0.2) == f"it stopped at auto's limit of 9,102 {short}"


def test_train_refuses_existing_run_without_resume_and_leaves_it_untouched(trained, model):
    before = (model / "model.safetensors").read_bytes()
    message = refused(2, "train", trained / "names.txt", *TINY, "--out", model)
    assert "--resume" in message and str(model).lower() in message
    assert (model / "model.safetensors").read_bytes() == before


def test_out_onto_a_file_is_refused_and_the_file_kept(trained, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert "is a file" in refused(2, "train", trained / "names.txt", *TINY, "--out", target)
    assert "is a file" in refused(2, "train", trained / "names.txt", *TINY, "--out", target, "--resume")
    under = refused(2, "train", trained / "names.txt", *TINY, "--out", target / "run")  # (a usage error, said at once)
    assert under.endswith(f"{target} is a file, so it cannot hold the run's directory".lower())
    assert target.read_text() == "keep me"
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # (mkdir would say "File exists", after the corpus)
    assert "gone is a broken symbolic link, so it" in refused(2, "train", trained / "names.txt", *TINY, "--out",
                                                               tmp_path / "gone" / "run")


def test_validation_on_training_text_is_warned_about(trained, tmp_path):
    result = ok("train", trained / "names.txt", *TINY, "--val", trained / "names.txt", "--out", tmp_path / "r")
    assert "warning: --val" in result.stderr and "also training text" in result.stderr


def test_training_text_given_twice_is_warned_about(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    write_names(books / "a.txt")
    write_names(tmp_path / "b.txt")
    quick = ("--preset", "tiny", "--max-steps", "1")
    twice = ok("train", books / "a.txt", tmp_path / "b.txt", books / "a.txt", *quick, "--out", tmp_path / "r1")
    assert f"warning: {books / 'a.txt'} repeats text already given ({books / 'a.txt'})" in twice.stderr
    assert "repeats text" in ok("train", books, books / "a.txt", *quick, "--out", tmp_path / "r2").stderr
    assert "repeats text" not in ok("train", books, tmp_path / "b.txt", *quick, "--out", tmp_path / "r3").stderr


def test_a_model_without_resume_state_is_not_sent_back_and_forth_between_flags(trained, model, tmp_path):
    # without its state.safetensors a run cannot be resumed; neither message may send the user to the other
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    for flags in ([], ["--resume"]):
        message = refused(2, "train", trained / "names.txt", *TINY, "--out", copy, *flags)
        assert "state.safetensors" in message and ("another --out" in message or "new --out" in message), message
        assert "add --resume" not in message and "drop --resume" not in message


def test_directory_corpus_resumes_without_out_where_its_fresh_run_went(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.texts").mkdir()
    write_names(tmp_path / "my.texts" / "a.txt")
    ok("train", "my.texts", "--preset", "tiny", "--max-steps", "2")
    assert (tmp_path / "runs" / "my.texts" / "model.safetensors").is_file()
    resumed = ok("train", "my.texts", "--preset", "tiny", "--max-steps", "4", "--resume")
    assert "does not apply to a resumed run" in resumed.stderr  # --preset: the run keeps its model
    assert json.loads(ok("info", "-m", "runs/my.texts", "--json").stdout)["summary"]["step"] == 4


def test_training_on_a_directory_twice_does_not_read_its_own_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_names(tmp_path / "a.txt")
    first = ok("train", ".", "--preset", "tiny", "--max-steps", "2").stdout
    second = ok("train", ".", "--preset", "tiny", "--max-steps", "2").stdout
    assert first.splitlines()[0].split(":")[-1] == second.splitlines()[0].split(":")[-1]  # same chars and vocab


def test_a_directory_s_skipped_utf16_file_is_named_with_the_flag_that_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "books").mkdir()
    write_names(tmp_path / "books" / "a.txt")
    (tmp_path / "books" / "b.txt").write_text("wide text\n" * 50, encoding="utf-16")
    (tmp_path / "books" / "c.bin").write_bytes(bytes(range(256)))
    result = ok("train", "books", "--preset", "tiny", "--max-steps", "2")
    assert "skipped 1 binary file found" in result.stderr  # (c.bin: left out by its suffix, silently)
    assert "b.txt is UTF-16/32 text: pass --encoding utf-16" in result.stderr


def test_resume_with_nothing_to_resume_says_so(trained, tmp_path):
    message = refused(2, "train", trained / "names.txt", *TINY, "--out", tmp_path / "nothing", "--resume")
    assert "nothing" in message and "resume" in message
    assert not (tmp_path / "nothing").exists()


def test_missing_corpus_file_is_named(tmp_path):
    message = refused(2, "train", tmp_path / "missing.txt", *TINY)
    assert "missing.txt" in message and "no such file" in message


def test_directory_without_text_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "w.safetensors").write_bytes(b"x")
    assert "no text files" in refused(2, "train", tmp_path / "empty", *TINY)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "e.txt").write_text("")
    assert "empty" in refused(2, "train", tmp_path / "e.txt", *TINY)


def test_binary_corpus_with_nul_bytes_is_refused(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"abc\x00def" * 100)
    message = refused(2, "train", tmp_path / "b.txt", *TINY)
    assert "nul" in message and "b.txt" in message


def test_invalid_utf8_is_refused_and_errors_replace_trains(tmp_path):
    path = write_names(tmp_path / "bad.txt", 100)
    path.write_bytes(path.read_bytes() + b"\xff\xfe oops\n")
    message = refused(2, "train", path, *TINY, "--out", tmp_path / "r")
    assert "utf-8" in message and "--errors replace" in message
    trained = ok("train", path, "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r", "--errors", "replace")
    chars = len(path.read_bytes())  # (ASCII, and each bad byte one U+FFFD)
    assert f"note: 2 of the {chars:,} chars are U+FFFD, which --errors replace puts where bytes" in trained.stderr
    assert "U+FFFD" not in ok("train", write_names(tmp_path / "good.txt", 100), "--preset", "tiny", "--max-steps", "2",
                              "--out", tmp_path / "r2", "--errors", "replace").stderr  # (none replaced: nothing said)


def test_corpus_shorter_than_context_trains_with_a_warning(tmp_path):
    (tmp_path / "short.txt").write_text("anna bob carla dave\n")
    result = ok("train", tmp_path / "short.txt", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r")
    assert "shorter than the context" in result.output


def test_hopelessly_short_corpus_is_refused(tmp_path):
    (tmp_path / "abc.txt").write_text("abc")
    assert "too short" in refused(2, "train", tmp_path / "abc.txt", *TINY, "--out", tmp_path / "r")
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_one_item_per_line_corpus_trains(tmp_path):
    (tmp_path / "words.txt").write_text("\n".join(NAMES * 5) + "\n")
    ok("train", tmp_path / "words.txt", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r")
    assert (tmp_path / "r" / "model.safetensors").is_file()
    sampled = ok("sample", "-m", tmp_path / "r", "-p", "\n", "-n", "40", "--seed", "1").stdout
    assert set(sampled) <= set("".join(NAMES) + "\n")  # (only characters the list holds)


@pytest.mark.parametrize("flags, words", [
    (["--n-embd", "30", "--n-head", "4"], ["--n-embd", "divisible", "--n-head"]),
    (["--n-layer", "0"], ["--n-layer", "positive"]),
    (["--n-embd", "-8"], ["--n-embd", "positive"]),
    (["--block-size", "0"], ["--block-size", "positive"]),
    (["--batch-size", "0"], ["--batch-size", "positive"]),
    (["--grad-accum", "0"], ["--grad-accum", "positive"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--time", "soon"], ["soon", "duration"]),
    (["--time", "0"], ["--time", "positive"]),
    (["--preset", "huge"], ["huge", "preset", "tiny"]),
    (["--dropout", "1.5"], ["--dropout"]),
    (["--val-fraction", "1"], ["--val-fraction"]),
    (["--dtype", "int8"], ["--dtype"]),
    (["--device", "tpu"], ["tpu"]),
    (["--seed", str(10**20)], ["--seed", "64 bits"]),
    (["--val", "names.txt", "--val-fraction", "0.5"], ["--val-fraction", "--val"]),
])
def test_bad_train_setting_is_named(trained, tmp_path, flags, words):
    args = ["train", trained / "names.txt", "--preset", "tiny", "--max-steps", "2", *flags, "--out", tmp_path / "r"]
    message = refused(2, *args)
    for word in words:
        assert word.lower() in message
    assert not (tmp_path / "r").exists()


# -- sample -----------------------------------------------------------------------------------

def test_sample_starts_with_the_prompt(in_trained):
    out = ok("sample", "--prompt", "anna ", "-n", "40", "--seed", "1").stdout
    assert out.startswith("anna ") and len(out) > len("anna ")


def test_sample_with_a_seed_reproduces(model):
    args = ("sample", "-m", model, "--prompt", "bob", "-n", "60", "--seed", "7")
    assert ok(*args).stdout == ok(*args).stdout
    assert ok(*args[:-1], "8").stdout != ok(*args).stdout


def test_sample_without_seed_prints_the_seed_it_chose(model):
    result = ok("sample", "-m", model, "--prompt", "bob", "-n", "20")
    seed = next(line.split()[1] for line in result.stderr.splitlines() if line.startswith("seed "))
    again = ok("sample", "-m", model, "--prompt", "bob", "-n", "20", "--seed", seed)
    assert again.stdout == result.stdout


def test_temperature_zero_is_deterministic(model):
    runs = {ok("sample", "-m", model, "--prompt", "eve", "-n", "50", "--temperature", "0",
               "--seed", str(seed)).stdout for seed in (1, 2, 3)}
    assert len(runs) == 1


def test_sample_json_has_the_documented_keys(model):
    lines = ok("sample", "-m", model, "--prompt", "gina", "-n", "30", "--seed", "3",
               "--num-samples", "3", "--json").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3 and [r["index"] for r in records] == [0, 1, 2]
    for r in records:
        assert {"prompt", "text", "seed", "settings"} <= r.keys()
        assert r["prompt"] == "gina" and r["seed"] == 3 and len(r["text"]) == 30
        assert r["finish_reason"] == "length"
        assert r["settings"].keys() == SampleConfig.__dataclass_fields__.keys()  # every setting, so it can be re-run
        assert r["settings"]["max_new_tokens"] == 30 and r["settings"]["num_samples"] == 3


def test_every_sample_flag_reaches_the_settings_it_names(model):
    """Each flag given a value unlike every other's default, so a dropped or swapped one shows."""
    record = json.loads(ok("sample", "-m", model, "-p", "anna", "-n", "7", "--temp", "0.7", "--top-k", "5",
                           "--top-p", "0.9", "--min-p", "0.02", "--repeat-penalty", "1.3", "--repeat-last-n", "11",
                           "--presence-penalty", "0.25", "--frequency-penalty", "0.5", "--seed", "9",
                           "--stop", "zz", "--dtype", "float32", "--json").stdout)
    assert record["settings"] == dict(
        max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9, min_p=0.02, repeat_penalty=1.3, repeat_last_n=11,
        presence_penalty=0.25, frequency_penalty=0.5, seed=9, num_samples=1, stop=["zz"], compile=False,
        dtype="float32")


def test_json_logprobs_align_with_the_text_even_after_a_stop(model):
    record = json.loads(ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--json",
                           "--logprobs", "--stop", "\n").stdout)
    assert len(record["logprobs"]) == len(record["text"]) > 0
    assert all(lp <= 0 for lp in record["logprobs"])


def test_color_by_prob_in_a_pipe_prints_the_same_text_and_no_legend_for_absent_colours(model):
    plain = ok("sample", "-m", model, "-p", "anna", "-n", "40", "--seed", "5").stdout
    coloured = ok("sample", "-m", model, "-p", "anna", "-n", "40", "--seed", "5", "--color-by-prob")
    assert coloured.stdout == plain
    assert "probability" not in coloured.stderr
    assert "--color-by-prob has no colours to show (the output is not a colour terminal)" in coloured.stderr


def test_color_by_prob_on_a_colour_terminal_explains_its_colours(model, monkeypatch):
    import io

    monkeypatch.delenv("NO_COLOR", raising=False)
    screen = io.StringIO()
    use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, color_system="truecolor"))
    result = ok("sample", "-m", model, "-p", "anna", "-n", "40", "--seed", "5", "--color-by-prob", "--no-stream")
    assert "probability" in result.stderr
    assert "\x1b[" in screen.getvalue()  # and the text is coloured


def test_stop_string_cuts_the_sample_and_is_not_printed(model):
    full = json.loads(ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--json").stdout)["text"]
    assert "\n" in full
    record = json.loads(ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--json",
                           "--stop", "\n").stdout)
    cut = record["text"]
    assert cut == full[:full.index("\n")] and record["finish_reason"] == "stop"
    streamed = ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--stop", "\n").stdout
    assert streamed == "anna" + cut + "\n"


def test_text_that_ends_its_line_at_a_stop_gets_no_empty_line_after_it(model):
    full = json.loads(ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--json").stdout)["text"]
    cut = full.index("\n") + 1
    stop = full[cut:cut + 3]
    assert len(stop) == 3 and full.index(stop) == cut  # (what this seed writes)
    for flags in ([], ["--no-stream"]):
        out = ok("sample", "-m", model, "-p", "anna", "-n", "200", "--seed", "5", "--stop", stop, *flags).stdout
        assert out == "anna" + full[:cut], flags


def test_color_by_prob_with_json_is_refused_not_ignored(model):
    assert "--logprobs" in refused(2, "sample", "-m", model, "-n", "3", "--json", "--color-by-prob")


def test_a_stop_string_the_model_cannot_write_is_warned_about(model):
    result = ok("sample", "-m", model, "-p", "anna", "-n", "5", "--seed", "5", "--stop", "X!", "--stop", "\n")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'X!'" in warnings[0] and "X, !" in warnings[0], result.stderr


def test_several_samples_are_each_shown_after_the_prompt(model):
    out = ok("sample", "-m", model, "-p", "kara", "-n", "10", "--seed", "1", "--num-samples", "2").stdout
    assert "sample 1/2" in out and "sample 2/2" in out and out.count("kara") >= 2


def test_a_batch_on_a_terminal_shows_each_sample_growing_then_prints_them_whole(model, monkeypatch):
    import io
    import re

    args = ("sample", "-m", model, "-p", "kara", "-n", "60", "--seed", "1", "--num-samples", "3")
    piped = ok(*args).stdout
    screen = io.StringIO()
    use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, width=80))
    ok(*args)
    raw = screen.getvalue()
    assert all(f"{i} │ \x1b[0mkara" in raw for i in (1, 2, 3))  # a line per sample while they grow...
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw.rsplit("\x1b[2K", 1)[1])  # ...erased, then the samples
    assert [line for line in final.splitlines() if "sample" not in line] == \
        [line for line in piped.splitlines() if "sample" not in line]


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory) -> Path:
    """A model of tab-separated lines and terminal colour codes."""
    root = tmp_path_factory.mktemp("raw")
    (root / "log.tsv").write_text("id\tname\t\x1b[31mERR\x1b[0m\n" * 60, encoding="utf-8")
    ok("train", root / "log.tsv", "--out", root / "run", "--preset", "tiny", "--max-steps", "2")
    return root / "run"


def test_sample_in_a_pipe_writes_the_prompt_and_text_byte_for_byte_tabs_and_escapes_too(raw_model):
    prompt = "id\tname\t\x1b[31m"
    for flags in (("--num-samples", "1"), ("--num-samples", "2"), ("--color-by-prob",),
                  ("--color-by-prob", "--no-stream")):
        result = invoke("sample", "-m", raw_model, "-p", prompt, "-n", "200", "--seed", "1", *flags)
        n = 2 if "2" in flags else 1
        assert result.exit_code == 0 and result.stdout.count(prompt) == n, (flags, result.stdout)  # rich's
        # tab expansion made the tabs spaces
        assert "␛" not in result.stdout and result.stdout.count("\x1b") > n, flags  # the model's own, raw


def test_sample_on_an_ascii_terminal_shows_control_characters_in_caret_notation(raw_model, monkeypatch):
    screen = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, width=80,
                                                        color_system=None))
    ok("sample", "-m", raw_model, "-p", "id\t\x1b[31mERR", "-n", "100", "--seed", "1")
    screen.flush()
    raw = screen.buffer.getvalue().decode("ascii")  # (␛ cannot be encoded: it was a UnicodeEncodeError)
    assert "^[[31mERR" in raw and "\x1b" not in raw


def test_sample_on_a_terminal_shows_control_characters_as_symbols(raw_model, monkeypatch):
    for flags in ((), ("--num-samples", "2"), ("--interactive",), ("--no-stream",)):  # a terminal without
        # colours: no ESC of rich's
        screen = io.StringIO()
        use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, width=80,
                                                            color_system=None))
        ok("sample", "-m", raw_model, "-p", "id\t\x1b[31mERR\x1b[0m", "-n", "200", "--seed", "1", *flags,
           input="\x1b[31mERR\n" if flags else None)
        raw = screen.getvalue().rsplit("\x1b[2K", 1)[-1].replace("\x1b[?25h", "")  # (a batch: after its live view)
        assert "id\t␛[31mERR␛[0m" in raw and "\x1b" not in raw, (flags, raw)  # (a tab, not rich's spaces)
        assert raw.count("␛") > 2  # the model's own, too


def test_empty_prompt_is_allowed(model):
    out = ok("sample", "-m", model, "--prompt", "", "-n", "20", "--seed", "1").stdout
    assert len(out.rstrip("\n")) > 0


def test_prompt_from_stdin(model):
    out = ok("sample", "-m", model, "--prompt", "-", "-n", "5", "--seed", "1", input="hugo").stdout
    assert out.startswith("hugo")
    crlf = subprocess.run([sys.executable, "-m", "tfcli", "sample", "-m", str(model), "-p", "-", "-n", "5"],
                          input=b"anna bob\r\nhugo", capture_output=True, timeout=60)  # (CliRunner's stdin
    assert crlf.returncode == 0 and crlf.stdout.startswith(b"anna bob\nhugo"), crlf.stderr  # translates \r\n)


def test_a_prompt_read_from_a_terminal_says_how_to_end_it(monkeypatch, capsys):
    from tfcli.commands.common import read_prompt

    class Keyboard(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr(sys, "stdin", Keyboard("anna\n"))
    assert read_prompt("-", None) == "anna\n"
    assert "reading the prompt from the terminal: type it, then Ctrl-D" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("anna\n"))  # piped: nothing to say
    assert read_prompt("-", None) == "anna\n" and capsys.readouterr().err == ""


def test_a_prompt_file_is_read_with_its_line_ends_as_written_as_stdin_is(tmp_path):
    from tfcli.commands.common import read_prompt
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\rc")
    assert read_prompt(None, tmp_path / "p.txt") == "a\r\nb\rc"  # (the vocabulary decides how \r reads)


def test_prompt_with_unknown_character_names_it(model):
    message = refused(2, "sample", "-m", model, "--prompt", "anna Z", "-n", "5")
    assert "vocabulary has no z;" in message and "--unknown" in message


def test_a_prompt_and_a_stop_string_are_read_in_the_spelling_the_vocabulary_knows(tmp_path):
    (tmp_path / "cafe.txt").write_text("un cafe\u0301 noir\n" * 200)  # é as e and a combining accent
    ok("train", tmp_path / "cafe.txt", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "run")
    result = ok("sample", "-m", tmp_path / "run", "-p", "un café", "-n", "20", "--seed", "1", "--stop", "café")
    assert result.stdout.startswith("un cafe\u0301")
    assert "unknown" not in result.stderr and "can never match" not in result.stderr


def test_unknown_skip_drops_and_replace_maps(model):
    skipped = ok("sample", "-m", model, "--prompt", "anQna", "-n", "5", "--seed", "1", "--unknown", "skip")
    assert skipped.stdout.startswith("anna") and "Q" in skipped.stderr and "starts from nothing" not in skipped.stderr
    emptied = ok("sample", "-m", model, "--prompt", "QQ", "-n", "5", "--seed", "1", "--unknown", "skip")
    assert "dropped unknown characters: Q (all the prompt had: the text starts from nothing)" in emptied.stderr
    emptied = ok("sample", "-m", model, "--prompt", "€", "-n", "5", "--seed", "1", "--unknown", "replace")
    assert ("dropped unknown characters with no look-alike in the vocabulary: € (all the prompt had: the text starts"
            in emptied.stderr) and "replaced" not in emptied.stderr
    both = ok("sample", "-m", model, "--prompt", "A€", "-n", "5", "--seed", "1", "--unknown", "replace")
    assert "replaced unknown characters: A→a; dropped unknown characters with no look-alike" in both.stderr
    replaced = ok("sample", "-m", model, "--prompt", "ANNA", "-n", "5", "--seed", "1", "--unknown", "replace")
    assert replaced.stdout.startswith("anna") and "A→a" in replaced.stderr


@pytest.mark.parametrize("flags, word", [
    (["--unknown", "guess"], "--unknown"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-p", "1.5"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"),
    (["-n", "-1"], "--max-new-tokens"),
    (["--stop", ""], "--stop"),
])
def test_bad_sample_setting_is_named(model, flags, word):
    assert word in refused(2, "sample", "-m", model, "--prompt", "a", *flags)


# -- choosing a model -------------------------------------------------------------------------

def test_no_runs_yet_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(2, "sample", "--prompt", "a")
    assert "tfcli train" in message and "-m" in message


def test_model_path_missing_is_named(tmp_path):
    message = refused(2, "info", "-m", tmp_path / "nope")
    assert "nope" in message and "no such" in message


def test_model_dir_without_checkpoint_is_named(tmp_path):
    message = refused(2, "info", "-m", tmp_path)
    assert "model.safetensors" in message


@pytest.mark.parametrize("content", [
    pytest.param(lambda good: good[: len(good) // 2], id="truncated"),
    pytest.param(lambda good: random.Random(1).randbytes(4096), id="random-bytes"),
    pytest.param(lambda good: pickle.dumps({"weights": [1.0, 2.0]}), id="pickle"),
    pytest.param(lambda good: b"", id="empty"),
])
def test_damaged_checkpoint_is_refused_in_one_line(model, tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content((model / "model.safetensors").read_bytes()))
    for command in (["info"], ["sample", "-p", "a"], ["eval", model.parent.parent / "names.txt"]):
        message = refused(1, *command, "-m", path)
        assert "model.safetensors" in message


def test_checkpoint_file_can_be_named_directly(model):
    out = ok("info", "-m", model / "best.safetensors").stdout
    assert "best.safetensors" in out
    assert "trained " in out and " tokens" not in out  # best.safetensors stores its step and loss, not a count


@pytest.mark.parametrize("command, word", [
    (["sample", "-n", "3", "--seed", str(10**20)], "--seed"),
    (["sample", "-n", "3", "--logprobs"], "--json"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["eval", "--max-chars", "0"], "--max-chars"),
])
def test_bad_sample_and_eval_settings_are_usage_errors(model, command, word):
    extra = [model.parent.parent / "names.txt"] if command[0] == "eval" else []
    assert word in refused(2, *command, *extra, "-m", model)


def test_top_k_zero_is_off_as_in_llama_cpp(model):
    args = ("sample", "-m", model, "-p", "anna", "-n", "30", "--seed", "4", "--json")
    assert json.loads(ok(*args, "--top-k", "0").stdout)["text"] == json.loads(ok(*args).stdout)["text"]
    assert json.loads(ok(*args, "--top-k", "1").stdout)["text"] != json.loads(ok(*args).stdout)["text"]


def test_seed_minus_one_means_random_and_prints_the_seed_drawn(model):
    seeds = [ok("sample", "-m", model, "-n", "3", "--seed", "-1").stderr for _ in range(2)]
    assert all(s.startswith("seed ") for s in seeds) and seeds[0] != seeds[1]


def test_greedy_sampling_prints_no_seed_as_none_changes_it(model):
    assert "seed" not in ok("sample", "-m", model, "-n", "3", "--temp", "0").stderr
    assert ok("sample", "-m", model, "-n", "3", "--temp", "0.5").stderr.startswith("seed ")


def test_eval_reads_undecodable_bytes_with_errors_replace_as_train_does(model, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"anna bob\n\xff\xfecarla\n")
    assert "--errors replace" in refused(2, "eval", bad, "-m", model)
    # read now: refused only for the U+FFFD it put in, a character the model never saw, which --unknown skip drops
    assert "--unknown skip" in refused(2, "eval", bad, "-m", model, "--errors", "replace")
    skipped = ok("eval", bad, "-m", model, "--errors", "replace", "--unknown", "skip", "--json")
    clean = tmp_path / "clean.txt"
    clean.write_text("anna bob\ncarla\n")
    scored = json.loads(skipped.stdout)
    assert scored.pop("skipped_chars") == 2
    assert scored == json.loads(ok("eval", clean, "-m", model, "--json").stdout)  # the rest, scored as it reads
    assert "skipped_chars" not in ok("eval", clean, "-m", model, "--json").stdout  # (only where --unknown skip)
    assert json.loads(ok("eval", clean, "-m", model, "--json", "--unknown", "skip").stdout)["skipped_chars"] == 0
    assert "skipped 2 characters the model never saw (� ×2)" in skipped.stderr


def test_prompt_file_saved_with_a_byte_order_mark_reads_without_it(model, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_bytes("\ufeffanna".encode())
    plain = ok("sample", "-m", model, "-p", "anna", "-n", "20", "--seed", "3", "--json").stdout
    assert ok("sample", "-m", model, "--prompt-file", prompt, "-n", "20", "--seed", "3", "--json").stdout == plain


def test_prompt_file_that_is_not_utf8_is_said_to_be_so_with_the_first_bad_byte(model, tmp_path):
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("café".encode("latin-1"))
    message = refused(2, "sample", "-m", model, "--prompt-file", prompt)
    assert message.endswith("latin1.txt: the prompt is not utf-8 text (byte 0xe9 at offset 3); save it as utf-8")
    prompt.write_bytes(codecs.BOM_UTF8 + "café".encode("latin-1"))  # (the offset counts the mark's 3 bytes too)
    assert "(byte 0xe9 at offset 6)" in refused(2, "sample", "-m", model, "--prompt-file", prompt)


def test_prompt_on_stdin_that_is_not_utf8_is_said_to_be_so(model):
    done = subprocess.run([sys.executable, "-m", "tfcli", "sample", "-m", str(model), "-p", "-", "-n", "3"],
                          input=b"\xff\xfeab", capture_output=True)
    assert done.returncode == 2 and b"not valid UTF-8" in done.stderr, done.stderr


def test_no_command_prints_the_help_and_no_empty_error():
    done = subprocess.run([sys.executable, "-m", "tfcli"], capture_output=True, text=True)
    assert "Usage" in done.stdout and "train" in done.stdout and "error" not in done.stderr


def test_typer_s_own_usage_errors_are_one_line_too():
    for args in (["train"], ["sample", "--bogus"], ["sample", "-n", "many"]):
        done = subprocess.run([sys.executable, "-m", "tfcli", *args], capture_output=True, text=True)
        assert done.returncode == 2
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert "--help" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("command", ["sample", "inspect-attention"])
def test_a_prompt_given_as_an_argument_is_pointed_to_p(command):
    # (`eval -` reads stdin, so a user tried `echo hi | tfcli sample -`)
    done = subprocess.run([sys.executable, "-m", "tfcli", command, "-"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("(a prompt goes after -p, and -p - reads it from stdin)\n")


@pytest.mark.parametrize("argv, hint", [
    (["sample", "-"], "(a prompt goes after -p, and -p - reads it from stdin)"),
    (["sample", "EXISTING"], "(a model goes after -m, as in -m EXISTING)"),
    (["sample", "-m", "r", "-p", "to", "be", "or"], "(quote a prompt of several words, as in -p '... be or')"),
    (["inspect-attention", "ROMEO"], "(a prompt goes after -p, as in -p 'ROMEO:')"),
    (["sample", "-n", "5", "10"], None),  # (a number: no guess)
    (["eval", "ROMEO"], None),  # (eval reads files)
])
def test_an_argument_too_many_is_said_to_be_what_it_most_likely_meant(argv, hint, tmp_path):
    from tfcli.cli import stray_hint

    argv = [str(tmp_path) if a == "EXISTING" else a for a in argv]
    extra = [a for a in argv[1:] if a not in ("-m", "r", "-p", "-n", "5", "to")]
    message = f"Got unexpected extra argument(s) ({' '.join(extra)})"
    assert stray_hint(argv[0], message, ["tfcli", *argv]) == (hint and " " + hint.replace("EXISTING", str(tmp_path)))


def fake_app(error: BaseException):
    import typer
    fake = typer.Typer()

    @fake.command()
    def go():
        raise error

    @fake.command()
    def other():
        pass
    return fake


def test_eof_in_a_command_is_a_one_line_error(monkeypatch, capsys):
    from tfcli import cli
    monkeypatch.setattr(cli, "app", fake_app(EOFError()))
    monkeypatch.setattr(sys, "argv", ["tfcli", "go"])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code == 1 and capsys.readouterr().err.strip() == "error: aborted"


def test_an_unexpected_error_in_a_command_reaches_the_caller_as_itself(monkeypatch):
    # run()'s handlers must not fail while matching it (a name missing from the installed typer did)
    from tfcli import cli
    monkeypatch.setattr(cli, "app", fake_app(LookupError("boom")))
    monkeypatch.setattr(sys, "argv", ["tfcli", "go"])
    with pytest.raises(LookupError, match="boom"):
        cli.run()


def test_under_torchrun_an_unknown_flag_is_said_by_rank_0_only(monkeypatch, capsys):
    from tfcli import cli
    monkeypatch.setattr(common, "QUIET_RANK_WAIT_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setattr(sys, "argv", ["tfcli", "train", "x.txt", "--bogus"])
        with pytest.raises(SystemExit) as done:
            cli.run()
        assert done.value.code == 2 and ("no such option: --bogus" in capsys.readouterr().err.lower()) == said


def test_on_off_flags_show_no_value_placeholder_in_help():
    for command in ("train", "sample", "eval", "info", "bench", "inspect-attention"):
        text = ok(command, "--help").stdout
        assert "<bool>" not in text and "list[" not in text  # (nor an argument's annotation: `CORPUS <list[Path]>`)


def test_help_in_a_pipe_gives_each_summary_whole_and_no_python_types():
    """`tfcli --help | less` (click's plain help) cut every summary at 45 characters: "Train a model on
    CORPUS; progress live on a...", and `train --help` read `CORPUS <list[Path]>`."""
    from tfcli.commands import bench, evaluate, info, inspect_attention, sample, train

    def piped(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tfcli", *args], capture_output=True, text=True, check=True)
        assert "╭" not in done.stdout  # (plain text, as in a pipe)
        return done.stdout
    text = " ".join(piped("--help").split())
    for command in (train.train, sample.sample, inspect_attention.inspect_attention, evaluate.eval_, info.info,
                    bench.bench):
        assert command.__doc__.strip().splitlines()[0] in text
    assert "..." not in text.replace("COMMAND [ARGS]...", "")
    assert "list[" not in piped("train", "--help") and "<bool>" not in piped("sample", "--help")
    stripped = subprocess.run([sys.executable, "-OO", "-m", "tfcli", "--help"], capture_output=True, text=True)
    assert stripped.returncode == 0 and "sample" in stripped.stdout  # (no docstrings: no summaries, no crash)


def test_help_keeps_every_default_it_states():
    # an unescaped [default: …] is rich markup, and vanished from the help
    assert "[default: 20]" in " ".join(ok("inspect-attention", "--help").stdout.split())


@pytest.mark.parametrize("value", ["int8", ""])
def test_bench_refuses_an_unknown_dtype_before_measuring(value):
    assert "--dtype must be" in refused(2, "bench", "--dtype", value, "--shape", "0.8M")


# -- inspect-attention ------------------------------------------------------------------------

def test_attention_shows_prompt_characters_with_visible_spaces(in_trained):
    out = ok("inspect-attention", "--prompt", "anna bob").stdout
    assert "anna␣bob" in out
    assert "L1 H0" in out and "L1 H1" in out
    assert "L0 H0" not in out  # with no --view: the last layer's heads


def test_attention_without_a_prompt_looks_at_text_the_model_writes(model):
    first = ok("inspect-attention", "-m", model, "--seed", "4", "--view", "summary")
    assert "looking at text the model wrote (seed 4;" in first.stderr
    assert first.stdout == ok("inspect-attention", "-m", model, "--seed", "4", "--view", "summary").stdout
    assert first.stdout != ok("inspect-attention", "-m", model, "--seed", "5", "--view", "summary").stdout
    assert "--seed does nothing with --prompt" in refused(2, "inspect-attention", "-m", model, "-p", "anna", "--seed",
                                                          "4")
    assert "seed" in ok("inspect-attention", "-m", model).stderr  # (a random one, printed)
    generated = ok("inspect-attention", "-m", model, "--view", "generated", "--generate", "3")
    seed = re.search(r"writes from its first character \(seed (\d+);", generated.stderr)  # (it printed none)
    assert seed and generated.stdout == ok("inspect-attention", "-m", model, "--view", "generated", "--generate", "3",
                                           "--seed", seed.group(1)).stdout
    bad = invoke("inspect-attention", "-m", model, "--layer", "7")
    assert bad.exit_code == 2 and "--layer 7 is out of range" in bad.stderr and "wrote" not in bad.stderr
    assert "(0 to 1, or -2 to -1 from the last)" in bad.stderr  # (negative ones are read: it named 0 to 1 only)
    assert ok("inspect-attention", "-m", model, "-p", "anna", "--layer", "-1").stdout == \
        ok("inspect-attention", "-m", model, "-p", "anna", "--layer", "1").stdout


@pytest.mark.parametrize("view, width, shown", [("grid", 40, 19), ("head", 40, 17)])
def test_attention_without_a_prompt_writes_as_much_text_as_the_heatmap_shows(model, monkeypatch, view, width, shown):
    screen = io.StringIO()
    use_consoles(monkeypatch, QuietConsole(file=screen, width=width, color_system=None))
    ok("inspect-attention", "-m", model, "--seed", "4", "--view", view)
    out = screen.getvalue()
    assert "showing positions" not in out  # all of it fits: its first rows are its first characters
    if view == "grid":
        assert len(out.splitlines()[0].removeprefix("text: ")) == shown
    else:
        assert [line.split()[0] for line in out.splitlines()[2:2 + shown]] == [str(i) for i in range(shown)]


def test_attention_takes_the_unknown_policy_of_sample(model):
    assert "--unknown skip|replace" in refused(2, "inspect-attention", "-m", model, "--prompt", "ANNA bob")
    skipped = ok("inspect-attention", "-m", model, "--prompt", "ANNA bob", "--unknown", "skip")
    assert "␣bob" in skipped.stdout and "dropped unknown characters" in skipped.stderr
    assert "anna␣bob" in ok("inspect-attention", "-m", model, "--prompt", "ANNA bob", "--unknown", "replace").stdout
    assert "nothing is left" in refused(2, "inspect-attention", "-m", model, "--prompt", "ANNA", "--unknown", "skip")


def test_attention_grid_view_shows_every_layer(model):
    out = ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--view", "grid").stdout
    assert all(f"L{layer} H{h}" in out for layer in (0, 1) for h in (0, 1))


def test_attention_head_and_focus_views(model):
    head = ok("inspect-attention", "-m", model, "--prompt", "eve gina", "--view", "head", "--layer", "0",
              "--head", "1").stdout
    assert "layer 0, head 1" in head
    focus = ok("inspect-attention", "-m", model, "--prompt", "eve gina", "--view", "focus", "--at", "2").stdout
    assert focus.startswith("attention from position 2 e\nL0 H0\n") and "L1 H1" in focus and ANSI not in focus


def test_attention_prompt_longer_than_context_shows_its_end(model):
    result = ok("inspect-attention", "-m", model, "--prompt", "anna bob " * 10 + "carla")
    assert "last 32 characters" in result.stderr


def test_attention_summary_labels_every_head_on_prompt_and_probe(model):
    out = ok("inspect-attention", "-m", model, "--prompt", "anna bob anna", "--view", "summary").stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("L")]
    assert [r[:2] for r in rows] == [["L0", "H0"], ["L0", "H1"], ["L1", "H0"], ["L1", "H1"]] * 2
    labels = {"previous", "current", "first", "duplicate", "induction", "local", "diffuse", "mixed"}
    assert {r[2] for r in rows} <= labels
    assert "on the prompt: anna␣bob␣anna" in out and "on the probe: 15 random characters" in out


def test_attention_lens_shows_each_stage_and_the_next_prompt_char(model):
    out = ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--view", "lens", "--at", "2").stdout
    assert "logit lens at position 2 n (next in the prompt: a)" in out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == ["embed", "L0", "L1"]


def test_attention_generated_is_reproducible_and_has_one_row_per_char(model):
    args = ("inspect-attention", "-m", model, "--prompt", "anna ", "--generate", "6", "--seed", "7")
    first = ok(*args).stdout
    assert first == ok(*args).stdout
    rows = [line for line in first.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == list(range(5, 11))
    assert "(mean over all layers and heads)" in first
    one = ok(*args, "--layer", "0", "--head", "1").stdout
    assert "(layer 0, head 1)" in one
    assert "(head 1, mean over all layers)" in ok(*args, "--head", "1").stdout
    assert "(layer 1, max over all heads)" in ok(*args, "--layer", "1", "--aggregate", "max").stdout


def test_attention_aggregate_shows_a_layers_heads_combined(model):
    out = ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--aggregate", "max").stdout
    assert "layer 1, max over 2 heads" in out


def test_attention_range_shows_only_those_positions(model):
    result = ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--view", "head", "--range", "2:5")
    labels = [line.split()[0] for line in result.stdout.splitlines()[2:5]]
    assert labels == ["2", "3", "4"] and " 5 " not in result.stdout
    assert "keys from position 2 on" in result.stderr  # (the earlier keys' share is not drawn: rows can look blank)
    assert "keys from" not in ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--view", "head").stderr


def test_attention_range_past_the_prompt_is_clamped_like_a_slice(model):
    for spec in ("5:30", "-100:"):
        out = ok("inspect-attention", "-m", model, "--prompt", "anna bob", "--view", "head", "--range", spec).stdout
        first = 5 if spec == "5:30" else 0
        assert [line.split()[0] for line in out.splitlines()[2:2 + 8 - first]] == [str(i) for i in range(first, 8)]


def test_attention_range_counts_positions_in_the_whole_prompt(model):
    text = "anna bob " * 10 + "carla"  # 95 characters; the context holds the last 32
    out = ok("inspect-attention", "-m", model, "--prompt", text, "--view", "focus", "--range", "80:", "--at", "85",
             "--layer", "1").stdout
    assert "attention from position 85" in out


def test_attention_range_picks_the_focus_query_not_the_keys_it_ranks(model):
    args = ("inspect-attention", "-m", model, "--prompt", "anna bob anna", "--view", "focus", "--at", "12")
    whole, ranged = ok(*args).stdout, ok(*args, "--range", "10:").stdout
    assert ranged == whole  # keys before position 10 are still ranked, as the model saw them


def test_attention_summary_with_a_range_scores_those_queries_over_all_their_keys(model):
    args = ("inspect-attention", "-m", model, "--prompt", "anna bob anna", "--view", "summary")
    whole = ok(*args).stdout
    ranged = ok(*args, "--range", "1:").stdout  # query 0 is never scored: the same scores
    assert "from positions 1:13 of the prompt: nna␣bob␣anna" in ranged
    assert [r for r in ranged.splitlines() if r.startswith("L")] == [r for r in whole.splitlines() if r.startswith("L")]


def test_attention_export_svg_html_and_json(model, tmp_path):
    args = ("inspect-attention", "-m", model, "--prompt", "anna bob")
    ok(*args, "--export", tmp_path / "a.svg")
    assert ElementTree.parse(tmp_path / "a.svg").getroot().tag.endswith("svg")
    fills = set(re.findall(r'fill="(#[0-9a-f]{6})"', (tmp_path / "a.svg").read_text(encoding="utf-8")))
    assert len(fills) > 10  # the colour scale, though this output is no terminal (it was five greys)
    ok(*args, "--view", "summary", "--export", tmp_path / "a.html")
    page = (tmp_path / "a.html").read_text(encoding="utf-8")
    assert "<html" in page and "anna␣bob" in page
    ok(*args, "--view", "head", "--layer", "0", "--export", tmp_path / "a.json")
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["text"] == "anna bob" and (record["offset"], record["first_query"]) == (0, 0)
    assert record["layers"] == [0] and record["heads"] == [0]  # (the head drawn: it held both)
    assert len(record["weights"]) == 1 and len(record["weights"][0]) == 1 and len(record["weights"][0][0]) == 8
    assert abs(sum(record["weights"][0][0][7]) - 1) < 1e-4
    ok(*args, "--view", "head", "--layer", "0", "--aggregate", "mean", "--export", tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text())["heads"] == [0, 1]  # (the mean drawn is of both)
    ok(*args, "--view", "head", "--head", "1", "--export", tmp_path / "a.json")  # a head of the last layer, as shown
    record = json.loads((tmp_path / "a.json").read_text())
    assert (record["layers"], record["heads"]) == ([1], [1])  # (it held every layer, the first one first)
    ok(*args, "--view", "focus", "--range", "5:8", "--export", tmp_path / "a.json")
    record = json.loads((tmp_path / "a.json").read_text())
    rows = record["weights"][0][0]  # the range's queries, each over every key it saw (the keys were cut too)
    assert (record["text"], record["first_query"], len(rows), len(rows[0])) == ("anna bob", 5, 3, 8)
    assert all(abs(sum(row) - 1) < 1e-4 for row in rows)


def test_attention_on_wide_characters_keeps_columns_aligned(tmp_path, monkeypatch):
    corpus = tmp_path / "cjk.txt"
    corpus.write_text("你好, 世界! こんにちは\n" * 50, encoding="utf-8")
    ok("train", corpus, "--out", tmp_path / "run", "--preset", "tiny", "--max-steps", "2")
    piped = ok("inspect-attention", "-m", tmp_path / "run", "--prompt", "你好, 世界!", "--view", "head").stdout
    assert all(line == line.rstrip() for line in piped.splitlines())  # a pipe gets no padding at line ends
    screen = io.StringIO()  # a terminal (without colours) gets the rows as drawn, every one as wide
    use_consoles(monkeypatch, QuietConsole(file=screen, force_terminal=True, color_system=None, width=80))
    ok("inspect-attention", "-m", tmp_path / "run", "--prompt", "你好, 世界!", "--view", "head")
    out = screen.getvalue()
    assert [line.rstrip() for line in out.splitlines()] == piped.splitlines()
    header, rows = out.splitlines()[1], out.splitlines()[2:9]  # after the title: header, one row per char
    assert len({cell_len(row) for row in rows} | {cell_len(header)}) == 1
    label = cell_len(rows[0]) - 2 * 7
    assert header[:label].strip() == "" and header[label:].startswith("你好,")


def test_attention_and_info_show_a_joiner_as_invisible_not_as_the_masked_dot(tmp_path):
    corpus = tmp_path / "emoji.txt"
    corpus.write_text("a 👨\u200d👩 b\n" * 50, encoding="utf-8")
    ok("train", corpus, "--out", tmp_path / "run", "--preset", "tiny", "--max-steps", "2")
    out = ok("inspect-attention", "-m", tmp_path / "run", "--prompt", "👨\u200d👩", "--view", "head").stdout
    header = out.splitlines()[1]
    assert "◌" in header and "·" not in header  # · is the masked future, in the rows below it
    assert "(◌: U+200D)" in ok("info", "-m", tmp_path / "run").stdout


@pytest.mark.parametrize("flags, word", [
    (["--layer", "2"], "--layer"),
    (["--layer", "-3"], "--layer"),
    (["--view", "head", "--head", "2"], "--head"),
    (["--view", "focus", "--at", "99"], "--at"),
    (["--view", "pie"], "--view"),
    (["--view", "summary", "--at", "1"], "--at"),
    (["--range", "x"], "--range"),
    (["--range", "3:2"], "--range"),
    (["--range", "9:"], "--range"),
    (["--aggregate", "sum"], "--aggregate"),
    (["--view", "head", "--aggregate", "max", "--head", "1"], "--head"),
    (["--generate", "0"], "--generate"),
    (["--export", "out.pdf"], "suffix"),
    (["--export", "/no/such/dir/out.svg"], "/no/such/dir does not exist"),
    (["--export", f"{__file__}/out.svg"], "test_cli.py is not a directory"),
])
def test_attention_out_of_range_is_named(model, flags, word):
    message = refused(2, "inspect-attention", "-m", model, "--prompt", "anna", *flags)
    assert word in message


def test_attention_export_to_a_directory_is_refused_and_a_failed_write_is_a_failure(model, tmp_path, monkeypatch):
    (tmp_path / "taken.svg").mkdir()
    assert "is a directory" in refused(2, "inspect-attention", "-m", model, "--prompt", "anna",
                                       "--export", tmp_path / "taken.svg")

    def full(*args, **kwargs):  # the request was fine; the disk said no
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr("tfcli.render.attention_views.export", full)
    assert "cannot write (no space left on device)" in refused(
        1, "inspect-attention", "-m", model, "--prompt", "anna", "--export", tmp_path / "a.svg")


def test_attention_empty_prompt_is_refused(model):
    assert "empty" in refused(2, "inspect-attention", "-m", model, "--prompt", "")


def test_attention_unknown_character_is_named(model):
    assert "vocabulary has no z;" in refused(2, "inspect-attention", "-m", model, "--prompt", "anna Z")


# -- eval and info ----------------------------------------------------------------------------

def test_eval_json_has_chars_loss_bpc_perplexity(model, trained):
    result = json.loads(ok("eval", trained / "names.txt", "-m", model, "--json").stdout)
    assert set(result) == {"chars", "loss", "bpc", "perplexity"}
    text = (trained / "names.txt").read_text()
    assert result["chars"] == len(text) - 1
    assert 0 < result["loss"] < 4 and abs(result["bpc"] * 0.6931 - result["loss"]) < 1e-3


def test_eval_holds_a_batch_to_half_the_free_memory_with_a_note(model, trained, monkeypatch):
    """`--batch-size 1000000` on a big text was to meet the OOM killer; the batch leaves the score alone."""
    scored = json.loads(ok("eval", trained / "names.txt", "-m", model, "--json").stdout)
    import tfcli
    from tfcli.memory import forward_bytes
    two = forward_bytes(tfcli.load(model).config, 2)
    monkeypatch.setattr("tfcli.memory.free_bytes", lambda swap=True: two)
    held = ok("eval", trained / "names.txt", "-m", model, "--json", "--batch-size", "1000000")
    assert held.stderr == ("note: scoring 1 window at a time, what half the free memory holds, not "
                           "--batch-size 1,000,000\n")
    result = json.loads(held.stdout)
    assert result["chars"] == scored["chars"] and result["loss"] == pytest.approx(scored["loss"], rel=1e-6)
    assert ok("eval", trained / "names.txt", "-m", model, "--batch-size", "1").stderr == ""  # (one fits: no note)


def test_eval_text_summary(model, trained):
    out = ok("eval", trained / "names.txt", "-m", model).stdout
    assert "bits/char" in out and "perplexity" in out


def test_eval_reads_stdin_for_dash(model, trained):
    text = (trained / "names.txt").read_text()
    piped = json.loads(ok("eval", "-", "-m", model, "--json", input=text).stdout)
    assert piped == json.loads(ok("eval", trained / "names.txt", "-m", model, "--json").stdout)
    assert "given once and alone" in refused(2, "eval", "-", trained / "names.txt", "-m", model, input=text)
    assert "stdin: contains nul bytes" in refused(2, "eval", "-", "-m", model, input="an\x00na")
    assert refused(2, "eval", "-", "-m", model, input="").startswith("error: stdin: empty")
    assert refused(2, "eval", "-", "-m", model, input="ANNA").startswith("error: stdin: has characters")


def test_eval_max_chars_scores_the_text_s_opening_only(model, trained, tmp_path):
    """A 401 MB text's eval had an eta of 1:46:41, and no way to ask for less."""
    text = (trained / "names.txt").read_text()
    (tmp_path / "opening.txt").write_text(text[:1001])
    first = json.loads(ok("eval", trained / "names.txt", "-m", model, "--json", "--max-chars", "1000").stdout)
    assert first == json.loads(ok("eval", tmp_path / "opening.txt", "-m", model, "--json").stdout)
    assert first["chars"] == 1000
    piped = json.loads(ok("eval", "-", "-m", model, "--json", "--max-chars", "1000", input=text).stdout)
    assert piped == first
    everything = json.loads(ok("eval", trained / "names.txt", "-m", model, "--json", "--max-chars", "10000000").stdout)
    assert everything["chars"] == len(text) - 1


def test_a_ctrl_c_during_eval_says_the_score_of_what_it_had_read(model, trained, monkeypatch):
    """An hour into a huge text, a Ctrl-C threw the score of what had been read away."""
    from tfcli import evaluation

    calls, real = [], evaluation._summed_loss

    def stopped_on_the_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(evaluation, "_summed_loss", stopped_on_the_second)
    result = invoke("eval", trained / "names.txt", "-m", model, "--batch-size", "2")
    assert result.exit_code == 130 and "Traceback" not in result.output
    total = len((trained / "names.txt").read_text()) - 1
    from tfcli.checkpoint import load_model
    block = load_model(model).config.block_size
    assert re.fullmatch(rf"interrupted: scored {2 * block:,} of {total:,} chars before the stop: loss \d\.\d{{4}} "
                        r"nats/char, \d\.\d{4} bits/char on those", result.stderr.strip()), result.stderr
    assert result.stdout == ""  # (the score is a note on stderr)
    calls.clear()
    scripted = invoke("eval", trained / "names.txt", "-m", model, "--batch-size", "2", "--json")
    assert scripted.exit_code == 130 and "before the stop" in scripted.stderr
    partial = json.loads(scripted.stdout)  # (--json printed nothing: a script got no object)
    assert partial["interrupted"] is True and (partial["chars"], partial["of_chars"]) == (2 * block, total)


def test_eval_of_two_characters_scores_one_char(model, tmp_path):
    (tmp_path / "two.txt").write_text("an")
    assert ok("eval", tmp_path / "two.txt", "-m", model).stdout.startswith("1 char: loss")


def test_eval_text_with_unseen_characters_is_named(model, tmp_path):
    (tmp_path / "other.txt").write_text("ANNA and BOB\n")
    message = refused(2, "eval", tmp_path / "other.txt", "-m", model)
    assert "never saw (a n b o);" in message and "other.txt" in message  # (refused() lowercases)


def test_eval_names_how_many_unseen_characters_it_does_not_list(model, tmp_path):
    (tmp_path / "other.txt").write_text("ABCDEFGHIJKLMN anna\n")
    assert "(a b c d e f g h i j and 4 more)" in refused(2, "eval", tmp_path / "other.txt", "-m", model)


def test_long_work_in_a_pipe_reports_progress_in_plain_lines(capsys):
    from tfcli.commands.evaluate import progress
    with progress(1000, "eval", "char", every=0.0) as update:
        for _ in range(4):
            update(250)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval: 250/1.0K chars (25%), 0:00 elapsed, eta ")
    assert len(lines) == 3  # (nothing once it is done: the result follows)


def test_eval_missing_file_is_named(model, tmp_path):
    assert "missing.txt" in refused(2, "eval", tmp_path / "missing.txt", "-m", model)


def test_info_shows_parameter_count(in_trained):
    params = json.loads(ok("info", "--json").stdout)["params"]
    out = ok("info").stdout
    assert f"{params:,} parameters" in out and "2 layers" in out and "trained 30 steps" in out
    assert "reached its --max-steps" in out  # (how the run ended: an interrupted one said no more than its steps)
    # what the run was trained with, resolved ("auto" came to this CPU's precision), so runs can be told apart
    summary = json.loads(ok("info", "--json").stdout)["summary"]
    assert f"  with muon, lr {summary['train']['lr']:g}, batch 16, {summary['dtype']} on cpu, seed 1337" in out
    assert summary["train"]["dtype"] == "auto" and summary["dtype"] in ("bfloat16", "float32")


def test_a_directory_of_runs_given_to_m_means_its_latest_run_and_says_which(in_trained):
    default = ok("info")
    assert "using runs/names" in default.stderr
    chosen = ok("info", "-m", "runs")
    assert chosen.stdout == default.stdout and "using runs/names" in chosen.stderr
    assert "using" not in ok("info", "-m", "runs/names").stderr  # (named, so nothing was chosen)
    assert "using" not in ok("info", "-m", "runs/names/model.safetensors").stderr


def test_info_names_the_best_validation_when_it_came_before_the_end(model, tmp_path):
    from tfcli import checkpoint as ckpt
    trained = ckpt.load_model(model)
    summary = {**trained.summary, "step": 90, "val_loss": 2.5, "best_val_loss": 1.25, "best_step": 40, "val_step": 90}
    ckpt.save_model(tmp_path / "m.safetensors", trained, trained.vocab, summary)
    shown = ok("info", "-m", tmp_path / "m.safetensors").stdout
    assert "val loss 2.5000; best 1.2500 at step 40 (best.safetensors)" in shown
    ckpt.save_model(tmp_path / "m.safetensors", trained, trained.vocab, {**summary, "val_step": 80})  # (Ctrl-C)
    assert "val loss 2.5000 at step 80; best" in ok("info", "-m", tmp_path / "m.safetensors").stdout
    ckpt.save_model(tmp_path / "m.safetensors", trained, trained.vocab, {**summary, "best_step": 90})
    assert "best" not in ok("info", "-m", tmp_path / "m.safetensors").stdout.split("  trained ")[1]


def test_info_shortens_a_big_vocabulary_to_a_line_and_says_how_many_more():
    from tfcli.commands.info import SHOWN_CHARS, vocabulary_line

    chars = "".join(chr(0x4E00 + i) for i in range(5000))  # (a CJK corpus: one 15,000-cell line)
    line = vocabulary_line(chars)
    assert line == chars[:SHOWN_CHARS] + f" … and {5000 - SHOWN_CHARS:,} more (--json lists them all)"
    assert vocabulary_line("ab\u200b") == "ab◌ (◌: U+200B)"  # (a format character, named by code point)


def test_info_json(model):
    record = json.loads(ok("info", "-m", model, "--json").stdout)
    n, v = 32, len(record["vocab"])  # tiny: 2 layers, 32 wide; embeddings tied or not, at least this many
    assert record["params"] > 2 * 12 * n * n + v * n and record["config"]["n_embd"] == n
    assert record["summary"]["step"] == 30 and "a" in record["vocab"]


def test_paths_with_brackets_are_printed_literally(model, tmp_path):
    odd = tmp_path / "[bold]run"
    odd.mkdir()
    (odd / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    assert "[bold]run" in ok("info", "-m", odd).stdout
    assert "[/x]" in refused(2, "info", "-m", tmp_path / "[/x]")


def test_unexpected_failure_is_one_line_unless_debug(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("tfcli.native_decoder.NativeModel.load", broken)  # (what `info` reads with)
    message = refused(1, "info", "-m", model)
    assert "disk on fire" in message and "--debug" in message
    result = invoke("--debug", "info", "-m", model)
    assert isinstance(result.exception, RuntimeError)


def test_no_color_on_a_terminal_still_shades_the_heatmap(model):
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "1"}  # FORCE_COLOR: act as on a terminal
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-m", "tfcli", "inspect-attention", "-m", str(model), "-p", "anna bob"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "anna␣bob" in out
    assert "38;" not in out and "48;" not in out  # no colour codes
    assert any(shade in out for shade in "░▒▓")  # without colour the weights are drawn as shades


def test_attention_help_says_weights_are_not_an_explanation():
    assert "not an explanation" in " ".join(ok("inspect-attention", "--help").stdout.split())


def test_sample_compile_says_when_the_c_kernel_makes_it_pointless(model, monkeypatch):
    import tfcli.sampling
    monkeypatch.setattr(tfcli.sampling, "native_decodes", lambda model, batch, cfg: True)
    assert "--compile is not used" in ok("sample", "-m", model, "-p", "kara", "-n", "5", "--seed", "1",
                                         "--compile").stderr
    monkeypatch.setattr(tfcli.sampling, "native_decodes", lambda model, batch, cfg: False)
    monkeypatch.setattr("tfcli.model.GPT.compiled_decoder", lambda self, cache: self.decode)  # no seconds compiling
    assert "--compile is not used" not in ok("sample", "-m", model, "-p", "kara", "-n", "5", "--seed", "1",
                                             "--compile").stderr
    monkeypatch.setattr("tfcli.device.can_compile", lambda: False)
    assert "none was found: sampling uncompiled" in ok("sample", "-m", model, "-p", "kara", "-n", "5", "--seed", "1",
                                                       "--compile").stderr


@pytest.mark.parametrize("flag", [("--dropout", "1.0"), ("--lr", "-1"), ("--eval-interval", "nan")])
def test_a_bad_training_flag_is_refused_before_the_corpus_is_read(tmp_path, flag):
    corpus = tmp_path / "text.txt"
    corpus.write_text("abcabd" * 100)
    result = invoke("train", corpus, *flag, "--out", tmp_path / "run")
    assert result.exit_code == 2 and flag[0] in result.stderr
    assert "corpus:" not in result.stdout and not (tmp_path / "run").exists()


def test_under_torchrun_a_usage_error_is_said_once_and_others_name_their_rank(monkeypatch, capsys):
    import typer

    sleeps = []
    monkeypatch.setattr(common.time, "sleep", sleeps.append)
    monkeypatch.setattr(common.signal, "signal", lambda signum, handler: None)
    # a rank other than 0 says a usage error only after the wait in which torchrun ends it when rank 0 met
    # the same one: still here, its error was its own (a corpus only its machine lacks was said by no one)
    for rank, code, said, waits in [("0", 2, "error: bad flag", 0), ("1", 2, "error: rank 1: bad flag", 1),
                                    ("1", 1, "error: rank 1: disk full", 0)]:
        sleeps.clear()
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(typer.Exit) as exited:
            common.fail("bad flag" if code == 2 else "disk full", code)
        assert exited.value.exit_code == code and len(sleeps) == waits
        assert capsys.readouterr().err.strip() == said
    monkeypatch.delenv("WORLD_SIZE")  # (a RANK outside torchrun means nothing to tfcli)
    with pytest.raises(typer.Exit):
        common.fail("bad flag", 2)
    assert capsys.readouterr().err.strip() == "error: bad flag"


def test_a_resumed_run_keeps_its_seed_and_says_a_new_one_does_not_apply(tmp_path):
    write_names(tmp_path / "names.txt")
    run = tmp_path / "run"
    ok("train", tmp_path / "names.txt", "--preset", "tiny", "--max-steps", "2", "--seed", "5", "--out", run)
    resumed = ok("train", tmp_path / "names.txt", "--out", run, "--resume", "--max-steps", "4", "--seed", "9")
    assert "--seed 9 does not apply to a resumed run" in resumed.stderr
    assert "note: the resumed run" not in resumed.stderr  # (nothing else was changed)
    ok("train", tmp_path / "names.txt", "--out", run, "--resume", "--max-steps", "6")  # (the printed command's form)
    summary = json.loads(ok("info", "-m", run, "--json").stdout)["summary"]
    assert (summary["step"], summary["train"]["seed"]) == (6, 5)  # (it read 1337: the flag's default won)
    lr, batch = summary["train"]["lr"], summary["train"]["batch_size"]
    changed = ok("train", tmp_path / "names.txt", "--out", run, "--resume", "--max-steps", "7", "--lr", str(lr * 2),
                 "--batch-size", str(batch), "--warmup-steps", "50")
    assert (f"note: the resumed run goes on with --lr {lr * 2} (the run's {lr:g}), --warmup-steps 50 (the run's "
            f"{summary['train']['warmup_steps']})\n") in changed.stderr  # (not the batch size, given as it was)


def test_a_backslash_n_typed_in_quotes_is_explained(model):
    message = refused(2, "sample", "-m", model, "--prompt", "anna\\nbob", "-n", "5")
    assert "a backslash and an n" in message and "$'\\n'" in message
    stop = ok("sample", "-m", model, "-p", "a", "--stop", "\\n\\n", "-n", "5", "--seed", "1")
    assert "can never match" in stop.stderr and "a backslash and an n" in stop.stderr


def test_the_printed_epoch_limit_resumes_to_the_same_step():
    import math

    from tfcli.commands.train import resume_limits
    from tfcli.config import TrainConfig
    from tfcli.events import Done
    epochs = 200 * 4096 / 22976  # auto's 200-step floor on a 23K-character text, as passes
    flag = resume_limits(Done(10, None, None, 5.0, Path("r"), "interrupted"), TrainConfig(epochs=epochs))
    printed = float(flag.split("--epochs ")[1])
    assert math.ceil(printed * 22976 / 4096) == 200  # (35.6546 made it 201)


def test_nanogpt_s_knobs_and_names_reach_the_run(tmp_path):
    write_names(tmp_path / "names.txt")
    run = tmp_path / "run"
    ok("train", tmp_path / "names.txt", "--preset", "tiny", "--max-iters", "10", "--learning-rate", "0.004",
       "--warmup-steps", "0", "--weight-decay", "0", "--grad-clip", "0", "--eval-steps", "5", "--out", run)
    summary = json.loads(ok("info", "-m", run, "--json").stdout)["summary"]
    want = dict(max_steps=10, lr=0.004, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, eval_steps=5,
                eval_interval=None)  # (--eval-steps alone: validation at those steps, whatever the speed)
    assert {k: summary["train"][k] for k in want} == want
    vals = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert vals == [5, 10]


@pytest.mark.parametrize("flag, value", [("--weight-decay", "-0.1"), ("--grad-clip", "nan"), ("--warmup-steps", "-1")])
def test_a_negative_tuning_knob_is_refused(flag, value, tmp_path):
    write_names(tmp_path / "names.txt")
    assert flag in refused(2, "train", tmp_path / "names.txt", flag, value, "--out", tmp_path / "run")


def test_a_run_into_a_directory_of_other_things_is_refused_before_the_text_is_read(tmp_path):
    """`-o runs` wrote a model beside runs/names, and `sample` went on using runs/names."""
    write_names(tmp_path / "names.txt")
    ok("train", tmp_path / "names.txt", "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "runs" / "names")
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    message = refused(2, "train", tmp_path / "names.txt", "--max-steps", "1", "--out", tmp_path / "runs")
    assert "holds other things than a run (names/)" in message and "--out" in message
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == before == ["names"]


def test_resume_of_a_run_still_starting_elsewhere_says_it_is_in_use(tmp_path):
    """A training in another process that had not saved yet: "no run to resume there" told nothing."""
    from tfcli import checkpoint as ckpt
    write_names(tmp_path / "names.txt")
    with ckpt.run_lock(tmp_path / "run"):
        message = refused(1, "train", tmp_path / "names.txt", "--resume", "--max-steps", "2", "--out", tmp_path / "run")
    assert "in use by another tfcli train, which has not saved yet" in message
    assert "no run to resume" in refused(2, "train", tmp_path / "names.txt", "--resume", "--out", tmp_path / "run")


def test_a_run_without_its_model_keeps_its_other_checkpoints_from_a_fresh_run(tmp_path):
    write_names(tmp_path / "names.txt")
    run = tmp_path / "run"
    ok("train", tmp_path / "names.txt", "--preset", "tiny", "--max-steps", "2", "--out", run)
    (run / "model.safetensors").unlink()  # (a save cut between its files, or a hand's mistake)
    kept = {name: (run / name).read_bytes() for name in ("best.safetensors", "state.safetensors")}
    assert "are kept" in refused(2, "train", tmp_path / "names.txt", "--out", run, "--resume", "--max-steps", "3")
    message = refused(2, "train", tmp_path / "names.txt", "--preset", "tiny", "--max-steps", "1", "--out", run)
    assert "earlier run's state.safetensors and best.safetensors" in message  # (following the first's advice)
    assert all((run / name).read_bytes() == data for name, data in kept.items())


@pytest.mark.parametrize("name", ["a.json", "a.html"])
def test_a_failed_export_leaves_an_earlier_file_whole(model, tmp_path, monkeypatch, name):
    import tfcli.checkpoint

    (tmp_path / name).write_text("keep me")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tfcli.checkpoint.os, "fsync", full)
    refused(1, "inspect-attention", "-m", model, "--prompt", "anna", "--export", tmp_path / name)
    assert (tmp_path / name).read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == [name]


def test_the_stop_flag_says_its_notice_through_a_dashboard_that_takes_one():
    import signal

    from tfcli.commands.train import StopFlag

    heard = []
    flag = StopFlag()
    flag.watching(type("View", (), {"say_soon": lambda self, m: heard.append(m), "__call__": lambda s, e: None})())
    flag.stopping(signal.SIGINT)
    assert heard == ["stopping after this step (Ctrl-C again quits at once)…"]


def test_a_command_s_flag_spelling_ends_with_it_however_it_ends(model, tmp_path):
    from tfcli.errors import at_command_line

    for args in (["info", "-m", model], ["train", tmp_path / "missing.txt"], ["sample", "-m", model, "--temp", "-1"]):
        invoke(*args)
        assert not at_command_line()  # (a notebook importing the CLI would read --flags otherwise)


def test_skip_says_what_it_kept_of_a_character_it_dropped_part_of(capsys):
    from tfcli.commands.common import fit_prompt
    from tfcli.corpus import Vocab

    vocab = Vocab.from_text("Unicode ROMabcd")
    assert fit_prompt(vocab, "Ünïcødé 日", "skip") == "Unicde "
    said = " ".join(capsys.readouterr().err.split())
    assert "dropped unknown characters: ø 日; kept what the model knows of: Ü→U, ï→i, é→e" in said
    fit_prompt(vocab, "Ünïcødé 日", "replace")
    said = " ".join(capsys.readouterr().err.split())
    assert "replaced unknown characters: Ü→U, ï→i, ø→o, é→e; dropped unknown characters with no look-alike" in said


def test_a_stop_string_is_checked_in_the_spelling_sampling_matches(capsys):
    """A composed é against a text that spells it e + ´ was said never to match, and did match."""
    from tfcli.commands.sample import warn_unmatchable_stops
    from tfcli.corpus import Vocab

    decomposed = Vocab.from_text("cafe\u0301 \n")
    warn_unmatchable_stops(("café", "\r\n"), decomposed)  # (a Windows line end matches as \n)
    assert "can never match" not in capsys.readouterr().err
    warn_unmatchable_stops(("caffè",), decomposed)
    assert "--stop 'caffè' can never match: the model never writes è" in capsys.readouterr().err


def test_an_option_a_view_ignores_names_the_views_it_applies_to_as_a_list(in_trained):
    """"(only to head and grid and focus and summary and lens)"."""
    message = refused(2, "inspect-attention", "-p", "anna", "--view", "generated", "--range", "0:2")
    assert "--range does not apply to --view generated (only to head, grid, focus, summary and lens)" in message
    assert "(only to head and generated)" in refused(2, "inspect-attention", "-p", "anna", "--view", "grid",
                                                     "--head", "0")


def test_info_says_a_run_was_interrupted_and_how_to_go_on(tmp_path):
    from tfcli.config import ModelConfig, TrainConfig
    from tfcli.corpus import load_corpus
    from tfcli.trainer import train

    corpus = load_corpus([write_names(tmp_path / "names.txt")])
    train(corpus, ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16),
          TrainConfig(max_steps=50, batch_size=4, device="cpu", dtype="float32"), tmp_path / "run",
          should_stop=lambda: True)  # (as a Ctrl-C after the first step)
    assert "trained 1 step" in (out := ok("info", "-m", tmp_path / "run").stdout)
    assert "interrupted (train ... --resume goes on)" in out
