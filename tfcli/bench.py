"""Throughput measurement: training tokens/s and sampling chars/s at nanoGPT's shapes.

The shapes are nanoGPT's (vocab 65) so figures compare with its published ones.
Training runs the same step `tfcli train` runs on this device (same precision,
optimizer and compile choice), on random tokens: speed does not depend on the
text. Each figure is the median over several timed windows, after warm-up.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import ModelConfig, SampleConfig
from .corpus import Vocab
from .device import autocast, compile_failure, compile_model, keep_freed_memory, pick_device, pick_dtype, should_compile
from .model import GPT
from .optim import make_optimizer
from .sampling import decode_dtype, generate, kernel_decodes, matmul_dtypes
from .trainer import grad_scaler, train_step


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int


SHAPES = {
    "0.8M": Shape(4, 4, 128, 64, 12),
    "4.8M": Shape(6, 4, 256, 128, 32),
    "10.7M": Shape(6, 6, 384, 256, 16),
}
VOCAB = 65
DEFAULT_TRAIN_SECONDS = 300.0  # bench measures what a default `tfcli train` (5 minutes) runs


def peak_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 12) -> float:
    """Best large-square-matmul rate: the ceiling the training figures are a share of.

    2048 squared fills a CPU; a GPU needs 8192 squared, or launch latency is what gets measured."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    with autocast(device, dtype):
        for _ in range(reps + 1):
            t = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _model(shape: Shape, device) -> GPT:
    cfg = ModelConfig(VOCAB, shape.n_layer, shape.n_head, shape.n_embd, shape.block_size)
    torch.manual_seed(0)
    return GPT(cfg).to(device)


def train_speed(shape: Shape, device, dtype, compile: bool, seconds: float = 6.0, windows: int = 5) -> dict:
    model = _model(shape, device)
    from .config import TrainConfig
    opt = make_optimizer(model, TrainConfig(), device)
    step_fn = compile_model(model) if compile else model
    x = torch.randint(VOCAB, (shape.batch_size, shape.block_size), device=device)
    y = torch.randint(VOCAB, (shape.batch_size, shape.block_size), device=device)

    scaler = grad_scaler(device, dtype)  # (a GPU without bf16 trains in float16, scaled)

    def step():
        train_step(step_fn, model, opt, x, y, device, dtype, 1.0, scaler)

    for _ in range(3):  # warm-up: allocator, compile, autotuning
        step()
    t = time.perf_counter()
    step()
    per_window = max(1, round(seconds / windows / (time.perf_counter() - t)))
    rates = []
    for _ in range(windows):
        t = time.perf_counter()
        for _ in range(per_window):
            step()
        rates.append(shape.batch_size * shape.block_size * per_window / (time.perf_counter() - t))
    tps = statistics.median(rates)
    return {"tokens_per_s": tps, "gflops": tps * model.flops_per_token() / 1e9, "params": model.num_params()}


def sample_speed(shape: Shape, device, n_chars: int = 500, reps: int = 3, compile: bool = False,
                 batches: tuple[int, ...] = (1,)) -> list[dict]:
    """Chars/s per sample over `n_chars` from a one-character prompt (the context fills, then
    the ring turns), for each batch size, median of `reps`; with `compile`, after one untimed
    generation that compiles the step. The batch sizes take turns, rep by rep, so that `cost`
    (per batch: its time against the first's, the median of the reps' own ratios) compares runs
    made under the same load: this host's speed drifted by a third within a minute.
    Weights in the precision `sample` picks (sampling.decode_dtype)."""
    model = _model(shape, device)
    for p in model.parameters():  # non-zero weights, so the work is real
        torch.nn.init.normal_(p, std=0.02)
    vocab = Vocab("".join(chr(33 + i) for i in range(VOCAB)))
    cfgs = [SampleConfig(max_new_tokens=n_chars, temperature=1.0, seed=0, compile=compile, num_samples=b)
            for b in batches]
    if compile:
        # past a full ring, so every graph the generation needs is built before the clock starts
        sum(1 for _ in generate(model, vocab, "!", replace(cfgs[0], max_new_tokens=2 * shape.block_size)))
    rates = [[] for _ in batches]
    for _ in range(reps):
        for cfg, got in zip(cfgs, rates):
            t = time.perf_counter()
            n = sum(1 for _ in generate(model, vocab, "!", cfg))
            got.append(n / (time.perf_counter() - t))
    return [{"chars_per_s": statistics.median(got), "dtype": str(decode_dtype(model, b)),
             "cost": statistics.median(first / r for first, r in zip(rates[0], got))} for b, got in zip(batches, rates)]


def first_char_seconds(shape: Shape, reps: int = 3) -> float:
    """`tfcli sample`'s cold start as a user meets it, median of `reps`: seconds from launching
    the command (a new Python, its imports, reading and laying out the checkpoint) to the first
    generated character on its stdout, for a model of this shape saved to a temporary run."""
    from .checkpoint import MODEL_FILE, save_model

    model = _model(shape, "cpu")
    vocab = Vocab("".join(chr(33 + i) for i in range(VOCAB)))  # (ASCII: one byte a character)
    times = []
    with tempfile.TemporaryDirectory(prefix="tfcli-bench-") as run_dir:
        save_model(Path(run_dir) / MODEL_FILE, model, vocab, {})
        command = [sys.executable, "-m", "tfcli", "sample", "-m", run_dir, "-p", "!", "-n", "5", "--seed", "0"]
        for _ in range(reps):
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            out = b""
            while len(out) < 2 and (byte := os.read(proc.stdout.fileno(), 1)):  # the prompt, then one
                out += byte
            times.append(time.perf_counter() - start)
            proc.communicate()
            if proc.returncode != 0 or len(out) < 2:
                raise RuntimeError(f"bench: `tfcli sample` exited {proc.returncode} before its first character")
    return statistics.median(times)


def run(device_name: str = "auto", dtype_name: str = "auto", compile: bool | None = None,
        shapes: list[str] | None = None, seconds: float = 6.0,
        on_stage: Callable[[str], None] = lambda what: None) -> dict:
    """The whole benchmark; `on_stage` hears of each part as it starts (a run of a minute or more
    printed nothing until its table)."""
    device = pick_device(device_name)
    dtype = pick_dtype(device, dtype_name)
    compile = should_compile(device, compile, seconds=DEFAULT_TRAIN_SECONDS)
    kept = keep_freed_memory()  # as `train` does
    on_stage("probing peak GFLOP/s")
    peak = peak_gflops(device, dtype)
    result = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "compile": compile,
              "peak_gflops": peak, "train": {}, "sample": {}, "decode_kernel": kernel_decodes(device),
              "decode_matmul": matmul_dtypes(device), "freed_memory_kept": kept}
    for name in shapes or list(SHAPES):
        on_stage(f"training {name}" + (" (compiling first)" if compile else ""))
        try:
            r = train_speed(SHAPES[name], device, dtype, compile, seconds)
        except Exception as e:  # noqa: BLE001 - only torch.compile's own failures are caught
            if not compile or (why := compile_failure(e)) is None:
                raise
            compile = result["compile"] = False  # (as train does: what it would run is uncompiled)
            on_stage(f"torch.compile could not build ({why}): training {name} uncompiled")
            r = train_speed(SHAPES[name], device, dtype, compile, seconds)
        r["peak_fraction"] = r["gflops"] / peak
        result["train"][name] = r
    for name in ("0.8M", "10.7M"):
        if shapes is None or name in shapes:
            on_stage(f"sampling {name}")
            one, sixteen = sample_speed(SHAPES[name], device, batches=(1, 16))  # (as long as one sample's)
            result["sample"][name] = {"chars_per_s": one["chars_per_s"], "dtype": one["dtype"],
                                      "num_samples_16_cost": sixteen["cost"],  # x one sample's time
                                      "num_samples_16_dtype": sixteen["dtype"]}  # (a batch's own weights)
            if device.type == "cpu":  # (`sample` runs on the CPU unless told otherwise)
                result["sample"][name]["first_char_s"] = first_char_seconds(SHAPES[name])
    # `sample --compile` pays off at this size only, and only where the C kernel does not run
    if (shapes is None or "0.8M" in shapes) and compile and not result["decode_kernel"]:
        on_stage("sampling 0.8M with --compile (compiling first)")
        fast, = sample_speed(SHAPES["0.8M"], device, n_chars=2000, compile=True)
        result["sample"]["0.8M"]["compiled_chars_per_s"] = fast["chars_per_s"]
    return result
