"""A checkpoint survives SIGKILL at any moment, including in the middle of being written."""

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tfcli.checkpoint import atomic_write, load_checkpoint

SAVER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from tfcli.checkpoint import save_model
    from tfcli.config import ModelConfig
    from tfcli.corpus import Vocab
    from tfcli.model import GPT
    torch.set_num_threads(1)
    model = GPT(ModelConfig(vocab_size=3, n_layer=4, n_head=4, n_embd=256, block_size=64))
    path = Path(sys.argv[1])
    step = 0
    while True:  # save forever, each save with different weights, until killed
        step += 1
        torch.nn.init.constant_(model.head.weight, float(step))
        save_model(path, model, Vocab("abc"), {"step": step})
        print(step, flush=True)
""")


def wait_for_new_temp_file(directory: Path, known: set[str], timeout: float = 10.0) -> None:
    """Until a save has begun writing its temp file, so the kill lands mid-write."""
    deadline = time.monotonic() + timeout
    while not {p.name for p in directory.glob("*.tmp")} - known:
        assert time.monotonic() < deadline, "no save started"


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    rng = random.Random(0)
    torn = 0
    for i in range(10):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed
        temps = {p.name for p in tmp_path.glob("*.tmp")}
        if i % 2:  # every other kill aimed inside a write, the rest at any moment
            wait_for_new_temp_file(tmp_path, temps)
            time.sleep(rng.uniform(0.0, 0.005))
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        torn += bool({p.name for p in tmp_path.glob("*.tmp")} - temps)  # the kill cut a write short
        ck = load_checkpoint(path)  # must parse, whatever moment the kill came
        step = ck.summary["step"]
        assert step >= 1 and (ck.state_dict["head.weight"] == float(step)).all()
    assert torn >= 3, f"only {torn} of 10 kills landed mid-write: the test did not test what it claims"
    atomic_write(path, path.read_bytes())  # the next save sweeps the temp files killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_write_keeps_a_private_file_private_writes_through_a_link_and_takes_long_names(tmp_path):
    private = tmp_path / "notes.json"
    private.write_bytes(b"old")
    private.chmod(0o600)
    atomic_write(private, b"new")
    assert private.read_bytes() == b"new" and (private.stat().st_mode & 0o777) == 0o600
    (tmp_path / "pub").mkdir()
    target, link = tmp_path / "pub" / "page.json", tmp_path / "link.json"
    target.write_bytes(b"old")
    link.symlink_to(target)
    atomic_write(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    long = tmp_path / ("a" * 250 + ".json")  # (a temporary name made by adding to it would pass 255)
    atomic_write(long, b"x")
    assert long.read_bytes() == b"x" and sorted(p.name for p in tmp_path.iterdir())[0] == long.name
