"""Bad input at the command line that test_cli.py does not cover: each is one line and an exit code.

Checkpoints that are not ours (foreign, newer, pickled), a corpus that is not text, a resume that
does not match its run, and a run that diverges: none of them may damage what is already on disk.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tfcli.checkpoint import load_checkpoint
from tfcli.cli import app

NAMES = ["anna", "bob", "carla", "dave", "eve", "frank", "gina", "hugo", "ines", "jack", "kara", "liam"]


def refused(code: int, *args) -> str:
    """Run a command that must fail; return its one error line."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.glob("*.safetensors")}


class CreatesFile:
    """Unpickling this creates the file at `path`: proof of whether anything ran pickle."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """names.txt and a finished 5-step tiny run beside it, in run/ (copy it before changing it)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    (root / "names.txt").write_text("\n".join(f"{rng.choice(NAMES)} {rng.choice(NAMES)}" for _ in range(300)) + "\n")
    torch.set_num_threads(1)
    result = CliRunner().invoke(app, ["train", str(root / "names.txt"), "--preset", "tiny", "--max-steps", "5",
                                      "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained / "run", tmp_path / "run"))


def test_too_many_distinct_characters_is_refused_as_not_text(tmp_path):
    (tmp_path / "cjk.txt").write_text("".join(chr(0x4E00 + i) for i in range(21_000)), encoding="utf-8")
    line = refused(2, "train", tmp_path / "cjk.txt", "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r")
    assert line == "error: 21,000 distinct characters: too many for a character model (limit 20,000); " \
                   "is this a binary file?"
    assert not (tmp_path / "r").exists()


def test_unknown_encoding_is_named(trained, tmp_path):
    line = refused(2, "train", trained / "names.txt", "--encoding", "klingon", "--out", tmp_path / "r")
    assert line == "error: unknown encoding 'klingon'"


def test_foreign_safetensors_file_is_refused(trained, tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, path, metadata={"format": "pt"})
    for command in (["info"], ["sample", "-p", "a"], ["eval", trained / "names.txt"]):
        assert refused(2, *command, "-m", path) == f"error: {path}: a safetensors file, but not a tfcli checkpoint"
        refused(2, *command, "-m", trained / "names.txt")  # (exit 2 as for any file that is not a checkpoint)


def test_checkpoint_from_a_newer_tfcli_asks_for_an_upgrade(run, tmp_path):
    ck = load_checkpoint(run / "model.safetensors")
    meta = {"format": "tfcli", "format_version": "2", "config": json.dumps(ck.config.to_dict()),
            "vocab": json.dumps(ck.vocab.chars)}
    path = tmp_path / "newer.safetensors"
    save_file(ck.state_dict, path, metadata=meta)
    assert refused(1, "sample", "-m", path, "-p", "a") == \
        f"error: {path}: written by a newer tfcli (format 2, this one reads 1); upgrade tfcli"


@pytest.mark.parametrize("name, dump", [("model.pt", torch.save), ("model.safetensors", torch.save),
                                        ("old.safetensors", lambda obj, path: torch.save(
                                            obj, path, _use_new_zipfile_serialization=False))])
def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, name, dump):
    planted = tmp_path / "pwned"
    path = tmp_path / name
    dump({"w": CreatesFile(planted)}, path)
    for command in (["info"], ["sample", "-p", "a"]):
        line = refused(1, *command, "-m", path)
        assert line.startswith(f"error: {path}: a pickle (what torch.save writes") and "never loads pickled" in line
    assert not planted.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_sampling_on_a_missing_gpu_is_a_usage_error(run):
    line = refused(2, "sample", "-m", run, "-p", "a", "--device", "cuda")
    assert "sees no CUDA GPU" in line and "--device cpu" in line


def test_resume_with_other_model_sizes_is_refused_and_keeps_the_run(trained, run):
    before = checkpoints(run)
    line = refused(2, "train", trained / "names.txt", "--out", run, "--resume", "--max-steps", "8", "--n-layer", "3")
    assert "settings differ from the run being resumed" in line
    assert checkpoints(run) == before


def test_resume_on_a_corpus_with_new_characters_is_refused(run, tmp_path):
    (tmp_path / "other.txt").write_text("ANNA BOB QUIZ FLY JEW\n" * 50)
    line = refused(2, "train", tmp_path / "other.txt", "--out", run, "--resume", "--max-steps", "8")
    assert "characters the run's vocabulary lacks" in line and "not the corpus this run trained on" in line
    assert "and 4 more)" in line  # (14 capitals: ten of them shown, and the count of the rest)


def test_divergence_never_replaces_the_last_good_checkpoint(trained, run, tmp_path):
    """lr 1e30 blows the weights up; whether the NaN first shows in a step's loss or only in the final
    validation, the run stops with one line and the checkpoints on disk stay the good ones."""
    pristine = checkpoints(run)
    outcomes = []
    for steps in (6, 7, 8, 9):
        for name, data in pristine.items():
            (run / name).write_bytes(data)
        result = CliRunner().invoke(app, ["train", str(trained / "names.txt"), "--out", str(run), "--resume",
                                          "--max-steps", str(steps), "--lr", "1e30"])
        outcomes.append(result.exit_code)
        if result.exit_code == 0:  # not yet blown up: whatever was saved is finite
            weights = load_checkpoint(run / "model.safetensors").state_dict.values()
            assert all(torch.isfinite(w).all() for w in weights)
            continue
        assert result.exit_code == 1 and "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "diverged" in errors[0], result.stderr
        assert checkpoints(run) == pristine
    assert 1 in outcomes  # the NaN really happened


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--n-head", "3"], "must be divisible by --n-head 3"),  # against the preset `auto` picks here
    (["--preset", "tiny", "--n-embd", "34", "--n-head", "2"], "must be even"),
    (["--preset", "tiny", "--n-embd", "30"], "= 15, must be even (rotary positions) (--n-head 2 comes from --preset"),
    (["--preset", "tiny", "--n-embd", "33"], "--n-head 2 (--n-head 2 comes from --preset tiny; give it too)"),
    (["--device", "nosuch"], "device"),
])
def test_flags_wrong_whatever_the_text_are_refused_before_it_is_read(tmp_path, monkeypatch, flags, message):
    # a multi-gigabyte corpus takes a while to read: a typo in a flag should not wait for it
    import tfcli.corpus

    def read(*a, **k):
        raise AssertionError("the corpus was read")
    monkeypatch.setattr(tfcli.corpus, "load_corpus", read)
    (tmp_path / "c.txt").write_text("hello world\n" * 50)
    line = refused(2, "train", tmp_path / "c.txt", *flags, "--out", tmp_path / "r")
    assert message in line
    assert not (tmp_path / "r").exists()
