"""A checkpoint survives SIGKILL at any moment, including in the middle of being written."""

import random
import signal
import subprocess
import sys
import textwrap
import time

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


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    rng = random.Random(0)
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(path)  # must parse, whatever moment the kill came
        step = ck.summary["step"]
        assert step >= 1 and (ck.state_dict["head.weight"] == float(step)).all()
    atomic_write(path, path.read_bytes())  # the next save sweeps the temp files killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
