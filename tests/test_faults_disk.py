"""A full disk or an unwritable run directory: one clear line, exit 1, nothing saved before is lost.

A real `tfcli train` runs in a subprocess whose file-size limit (RLIMIT_FSIZE) is set below the
size of a checkpoint, so its writes fail with EFBIG exactly where a full disk fails them with
ENOSPC: inside atomic_write, after the run has trained. No root, no tmpfs, no mocks.
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tfcli.checkpoint import MODEL_FILE, STATE_FILE, load_checkpoint, load_state

NAMES = ["anna", "bob", "carla", "dave", "eve", "frank", "gina", "hugo", "ines", "jack", "kara", "liam"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def tfcli(*args, cwd: Path, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    # stdout and stderr are pipes, which the limit does not touch: only the run directory's files fill up
    return subprocess.run([sys.executable, "-m", "tfcli", *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120, preexec_fn=limit_file_size if max_file_bytes else None)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def run(tmp_path) -> Path:
    """A finished 4-step run in tmp_path/run, trained from tmp_path/names.txt."""
    rng = random.Random(0)
    (tmp_path / "names.txt").write_text("\n".join(f"{rng.choice(NAMES)} {rng.choice(NAMES)}" for _ in range(300)))
    done = tfcli("train", "names.txt", "--preset", "tiny", "--max-steps", "4", "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "run"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir()}


@pytest.mark.parametrize("fits", ["nothing", "the model but not the state"])
def test_disk_full_during_a_save_keeps_every_earlier_file(run, fits):
    before = snapshot(run)
    model_size, state_size = len(before[MODEL_FILE]), len(before[STATE_FILE])
    limit = model_size // 2 if fits == "nothing" else (model_size + state_size) // 2
    assert model_size < state_size and len(before["metrics.jsonl"]) < limit
    result = tfcli("train", "names.txt", "--out", "run", "--resume", "--max-steps", "6", cwd=run.parent,
                   max_file_bytes=limit)
    assert result.returncode == 1
    assert re.fullmatch(r"error: cannot write run/(model|state)\.safetensors: File too large; "
                        r"earlier checkpoints are untouched", one_error_line(result))
    after = snapshot(run)
    assert after.keys() == before.keys()  # no temp file left behind
    assert after[STATE_FILE] == before[STATE_FILE]
    assert load_state(run / STATE_FILE)[1]["step"] == 4
    if fits == "nothing":
        assert after[MODEL_FILE] == before[MODEL_FILE]
    assert load_checkpoint(run / MODEL_FILE).summary["step"] in (4, 6)  # the old model, or a whole newer one
    resumed = tfcli("train", "names.txt", "--out", "run", "--resume", "--max-steps", "6", cwd=run.parent)
    assert resumed.returncode == 0, resumed.stderr  # room again: the run carries on from what was kept
    assert load_checkpoint(run / MODEL_FILE).summary["step"] == 6


def test_out_directory_under_a_regular_file_is_one_line(run):
    """Works as root too, where permission bits do not stop writes: no user may make a directory in a file."""
    (run.parent / "notes.txt").write_text("keep me")
    result = tfcli("train", "names.txt", "--preset", "tiny", "--max-steps", "2", "--out", "notes.txt/run",
                   cwd=run.parent)
    assert result.returncode == 2  # (said before the corpus is read: a usage error)
    assert one_error_line(result) == ("error: --out notes.txt/run: notes.txt is a file, so it cannot hold the run's "
                                      "directory")
    assert (run.parent / "notes.txt").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the test above")
def test_read_only_out_directory_is_one_line_and_keeps_the_run(run):
    before = snapshot(run)
    run.chmod(0o500)
    try:
        result = tfcli("train", "names.txt", "--out", "run", "--resume", "--max-steps", "6", cwd=run.parent)
    finally:
        run.chmod(0o700)
    assert result.returncode == 1
    assert "permission denied" in one_error_line(result).lower()
    assert snapshot(run) == before
