"""Data-parallel training: torchrun's environment, batch shares, and real 2-process gloo runs on the CPU."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tfcli import checkpoint as ckpt
from tfcli.cli import app
from tfcli.config import ModelConfig, TrainConfig
from tfcli.corpus import load_corpus
from tfcli.distributed import World
from tfcli.errors import UsageError, command_line
from tfcli.model import GPT
from tfcli.trainer import train

PATTERN = "abcabd"
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
TRAIN = TrainConfig(max_steps=2, batch_size=8, device="cpu", dtype="float32", compile=False)


def test_without_torchrun_there_is_one_process():
    assert World.from_env({}) == World(0, 0, 1)
    assert World.from_env({"PATH": "/bin"}).is_main and not World().is_distributed


def test_torchrun_environment_places_the_process():
    world = World.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (world.rank, world.local_rank, world.size, world.is_main, world.is_distributed) == (3, 1, 4, False, True)


@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"}])
def test_bad_torchrun_environment_is_a_usage_error(env):
    with pytest.raises(UsageError):
        World.from_env(env)


def test_more_processes_on_a_machine_than_it_has_gpus_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="--nproc-per-node 1, or device='cpu'"):
        World(rank=1, local_rank=1, size=2).device(torch.device("cuda"))


def test_shares_of_a_batch_are_disjoint_and_cover_it():
    rows = [World(r, r, 4).share(12) for r in range(4)]
    assert [list(range(12))[s] for s in rows] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_batch_that_does_not_split_evenly_is_refused_before_training(tmp_path):
    corpus = load_corpus([_write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match="batch of 9 rows .* over 2 processes; pass a batch_size that is a multiple"):
        train(corpus, MODEL, replace(TRAIN, batch_size=9), tmp_path / "run", world=World(0, 0, 2))
    with command_line(), pytest.raises(UsageError, match=r"9 rows \(--batch-size, .* pass a --batch-size that"):
        train(corpus, MODEL, replace(TRAIN, batch_size=9), tmp_path / "run", world=World(0, 0, 2))
    assert not (tmp_path / "run").exists()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.txt"
    path.write_text(text)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# lr 0.9 with the tiny preset's 30 warmup steps: 0.03 then 0.06, so two steps move every weight far more
# than summation order could. AdamW, not the default Muon: Muon's bfloat16 Newton-Schulz, on the first
# gradient a zero-initialised projection gets, turned fp32 rounding into differences above any useful
# tolerance on a 16-core GPU host (not on the 2-core Zen 4 CI uses); AdamW's first steps are near sign(gradient).
ARGS = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "8", "--lr", "0.9", "--seed", "5",
        "--dtype", "float32", "--no-compile", "--device", "cpu", "--optimizer", "adamw"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training by `torchrun --nproc-per-node 2 -m tfcli train` (gloo) and by one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    corpus = tmp / "t.txt"
    corpus.write_text(PATTERN * 40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "tfcli", "train", str(corpus), *ARGS, "--out", "two"]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    one = CliRunner().invoke(app, ["train", str(corpus), *ARGS, "--out", str(tmp / "one")])
    assert one.exit_code == 0, one.output
    return two, tmp / "two", tmp / "one"


def test_torchrun_run_writes_one_checkpoint_from_rank_0(runs):
    result, two, _ = runs
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 2 steps") == 1  # only rank 0 reports
    assert "Warning" not in result.stderr
    assert {p.name for p in two.iterdir()} == {ckpt.MODEL_FILE, ckpt.BEST_FILE, ckpt.STATE_FILE, ckpt.METRICS_FILE}
    summary = ckpt.load_checkpoint(two / ckpt.MODEL_FILE).summary
    assert summary["step"] == 2 and summary["tokens"] == 2 * 8 * 32  # the global batch, not one process's share
    records = [json.loads(line) for line in (two / ckpt.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # each step written once, not once per process
    assert [r["step"] for r in records if "val_loss" in r] == [2]


def test_two_processes_take_the_same_steps_as_one_with_the_whole_batch(runs):
    result, two, one = runs
    assert result.returncode == 0, result.stderr[-3000:]
    trained = ckpt.load_checkpoint(one / ckpt.MODEL_FILE)
    torch.manual_seed(5)
    start = GPT(trained.config).state_dict()  # the weights before the first step
    split = ckpt.load_checkpoint(two / ckpt.MODEL_FILE).state_dict
    for k, whole in trained.state_dict.items():
        moved = (whole - start[k]).norm()
        assert moved > 1e-2, k  # every tensor moved...
        # ...and alike in both runs, to 5% of the move: room for one element whose gradient is so near 0 that
        # rounding flips its sign (3% of a 64x64 matrix's move); a process that missed the other's gradients
        # would differ in many
        assert (split[k] - whole).norm() < 5e-2 * moved, k


def test_a_corpus_only_one_machine_lacks_is_said_and_ends_the_job_at_once(tmp_path):
    """Rank 1's missing file: no process said it (a usage error was rank 0's to say), and rank 0, waiting
    in C++ for rank 1 to join, heard torchrun's SIGTERM only as its SIGKILL 30 s later."""
    corpus = _write(tmp_path, PATTERN * 40)
    launcher = tmp_path / "per_rank.sh"  # (each rank's own corpus path, as on two machines)
    launcher.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && c={tmp_path}/absent.txt || c={corpus}\n'
                        f'exec {sys.executable} -m tfcli train "$c" "$@"\n')
    launcher.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--no-python", str(launcher), *ARGS, "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert f"error: rank 1: {tmp_path}/absent.txt: no such file or directory" in done.stderr
    assert "forcefully exiting via 9" not in done.stderr  # (torchrun's SIGKILL, 30 s on: rank 0 ended at its SIGTERM)


@pytest.mark.parametrize("rank_1", ["other text", "--batch-size 16", "--seed 6", "--device cpu:0"])
def test_processes_given_different_texts_or_settings_are_told_so_before_training(tmp_path, rank_1):
    """A batch size or seed only one process had (as `--preset auto` could pick on machines of different
    kinds) trained without a word: each process took its share of a different batch."""
    corpus = _write(tmp_path, PATTERN * 40)
    other = tmp_path / "other.txt"
    other.write_text(PATTERN[::-1] * 40)  # (the same characters, so only the text's digest tells them apart)
    text, extra = (other, "") if rank_1 == "other text" else (corpus, rank_1)
    launcher = tmp_path / "per_rank.sh"
    launcher.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && c={text} e="{extra}" || c={corpus} e=\n'
                        f'exec {sys.executable} -m tfcli train "$c" "$@" $e\n')  # (the last of a flag counts)
    launcher.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "--no-python", str(launcher), *ARGS, "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if rank_1.startswith("--device"):  # each process names its own device (as cuda:LOCAL_RANK): the same steps
        assert done.returncode == 0, done.stderr[-3000:]
        return
    assert done.returncode != 0
    what = "text or model settings" if rank_1 == "other text" else "training settings"
    assert f"error: rank 1's {what} differ from rank 0's" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "r" / ckpt.MODEL_FILE).exists()


def test_a_time_budget_spent_before_the_first_step_ends_every_process_alike(tmp_path):
    """Each process counts its budget from its own start, rank 0's the latest: one could refuse the first
    step while the other began it and waited in its all-reduce. The least budget is every process's."""
    corpus = _write(tmp_path, PATTERN * 40)
    args = [a for a in ARGS if a not in ("--max-steps", "2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "tfcli", "train", str(corpus), *args, "--time", "1",
           "--out", "r"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "error: --time (1 s) ran out before the first step" in done.stderr
    assert "another process" not in done.stderr and not (tmp_path / "r").exists()
