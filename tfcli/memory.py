"""Whether a training step fits in the machine's memory, asked before the first step.

On Linux malloc does not refuse what the machine cannot hold: the kernel's OOM killer ends the
process partway into the first step, and the shell prints "Killed" (exit 137). `--batch-size
20000` on a 2-layer model wanted about 29 GiB of a 24 GiB machine and died so, 80 s in, with no
word of why. A CPU's step is checked here instead; a GPU's allocator refuses with an error of its
own, which the CLI words (`commands.common.out_of_memory`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .config import ModelConfig
from .errors import UsageError, setting

# Bytes a token of a micro-batch holds through a float32 training step (what the forward keeps for
# the backward, and the gradients): on a CPU, eager and compiled, 85-111 per layer and unit of
# width, and about 15 per vocabulary entry (the logits and theirs). These are the low ends, and
# the optimizers' states and gradients (PER_PARAM) are all else counted, so the estimate falls
# short of a step's real peak: a step refused would not have fitted.
PER_LAYER_WIDTH = 80
PER_VOCAB = 12
PER_PARAM = 12  # a parameter's gradient and the optimizers' states, made by the first step

# Bytes a token holds at the peak of a forward without gradients (`eval`), measured on a CPU over
# eight shapes: 61-65 per unit of width where each activation is big enough for glibc to map it
# alone, up to 101 where it comes from the heap (under 32 MB: see device.keep_freed_memory) and
# leaves gaps, and 8 per vocabulary entry (the logits and their log-softmax). Rounded up, since
# this one caps a batch.
FORWARD_PER_WIDTH = 128
FORWARD_PER_VOCAB = 12


def step_bytes(cfg: ModelConfig, sequences: int, params: int) -> int:
    """At least what one micro-batch of `sequences` adds to the process's memory in a step."""
    per_token = PER_LAYER_WIDTH * cfg.n_layer * cfg.n_embd + PER_VOCAB * cfg.vocab_size
    return sequences * cfg.block_size * per_token + PER_PARAM * params


def forward_bytes(cfg: ModelConfig, sequences: int) -> int:
    """About what a no-grad forward of `sequences` windows adds to the process's memory, at most."""
    return sequences * cfg.block_size * (FORWARD_PER_WIDTH * cfg.n_embd + FORWARD_PER_VOCAB * cfg.vocab_size)


def windows_that_fit(cfg: ModelConfig, share: float = 0.5, free: int | None = None) -> int | None:
    """Windows a no-grad forward may take within `share` of the free memory, swap left out, since a
    pass that pages would crawl (at least one); None where that cannot be read."""
    free = free_bytes(swap=False) if free is None else free
    return None if free is None else max(1, int(free * share) // forward_bytes(cfg, 1))


def free_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup"),
               swap: bool = True) -> int | None:
    """Memory this process could still take: the kernel's estimate of what is available (with the
    free swap, unless not `swap`), or what is left under the cgroup's limit (a container's),
    whichever is less. None where neither can be read (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        swapped = int(fields.get("SwapFree", "0 kB").split()[0]) if swap else 0
        free = (int(fields["MemAvailable"].split()[0]) + swapped) * 1024
    except (OSError, KeyError, ValueError):
        free = None
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes",
                                                            "memory/memory.usage_in_bytes")):
        try:
            left = int((cgroup / limit).read_text()) - int((cgroup / usage).read_text())
        except (OSError, ValueError):  # ("max": no limit; or no such cgroup)
            continue
        free = left if free is None else min(free, left)
    return None if free is None else max(free, 0)


def check_step_fits(cfg: ModelConfig, sequences: int, accum: int, params: int, free: int | None = None,
                    processes: int | None = None) -> None:
    """Refuse a step whose micro-batch (`sequences` split in `accum`) would not fit in `free` bytes
    (None: this machine's), shared by this machine's `processes` (torchrun's LOCAL_WORLD_SIZE),
    naming the --grad-accum that would fit, if one does."""
    free = free_bytes() if free is None else free
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if free is None:
        return

    def need(parts: int) -> int:
        return step_bytes(cfg, sequences // parts, params) * processes

    if need(accum) <= free:
        return
    what = f"{sequences:,} sequences of {cfg.block_size:,} characters"
    what = what if accum == 1 else f"{what} in {accum} parts"
    fits = max(0, free // processes - step_bytes(cfg, 0, params)) // step_bytes(cfg, 1, 0)  # sequences a part
    most = max((d for d in (_divisors(sequences) if fits else []) if d <= fits), default=None)
    parts = None if most is None else sequences // most
    fix = (f"{setting('grad_accum', parts)} takes the same step in {parts} parts, or use a smaller "
           f"{setting('batch_size')}" if parts else
           f"use a smaller {setting('block_size')} or model")
    raise UsageError(f"a training step of {what} needs at least {_gib(need(accum))} of memory, and "
                     f"{_gib(free)} is free here; {fix}")


def _divisors(n: int) -> list[int]:
    """n's divisors, found in √n tries: a --batch-size of 10**9 + 7 (a prime) is to be answered, not hung on."""
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return small + [n // i for i in small]


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
