"""Data-parallel training over the processes torchrun starts (DistributedDataParallel).

torchrun tells each process its place through RANK, WORLD_SIZE and LOCAL_RANK. Every
process draws the same global batch of windows and trains on its own equal share of it;
DDP averages the gradients, which equals the whole batch's mean gradient, so N processes
take the same steps as one process given the whole batch. Per step the processes also
agree on the clock and on stopping (the slowest clock, any stop request), so the learning
rate and the last step are the same everywhere. Rank 0 alone reports and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError, setting
from .stopping import default_signals


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process's place among all processes
    local_rank: int = 0  # its place on this machine: which GPU it drives
    size: int = 1  # processes in all

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> World:
        """The place torchrun gave this process; one process alone when not started by torchrun."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world = cls(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
        except ValueError:
            raise UsageError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (start tfcli with torchrun)") from None
        if not 0 <= world.rank < world.size:
            raise UsageError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
        return world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def device(self, device: torch.device) -> torch.device:
        """On CUDA each process drives the GPU of its local rank."""
        if self.is_distributed and device.type == "cuda":
            gpus = torch.cuda.device_count()
            if self.local_rank >= gpus:  # else CUDA's "invalid device ordinal", as a traceback per process
                raise UsageError(f"torchrun started more processes on this machine than it has CUDA GPUs "
                                 f"({gpus}); use --nproc-per-node {gpus}, or {setting('device', 'cpu')}")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def share(self, batch_size: int) -> slice:
        """This process's rows of a global batch of `batch_size` (which must split evenly)."""
        if batch_size % self.size:
            raise UsageError(f"a batch of {batch_size} rows ({setting('batch_size')}, the preset's or the resumed "
                             f"run's) does not split evenly over {self.size} processes; pass a "
                             f"{setting('batch_size')} that is a multiple of {self.size}")
        rows = batch_size // self.size
        return slice(self.rank * rows, (self.rank + 1) * rows)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the other processes (nccl on GPUs, gloo on CPUs) for the duration; leave together."""
    if not world.is_distributed or dist.is_initialized():
        yield
        return
    with default_signals():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank, world_size=world.size)
    try:
        yield
        dist.barrier()  # rank 0's final validation and save end before any process leaves
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """The model DDP-wrapped when there are several processes (its weights start as rank 0's)."""
    if not world.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def agree(world: World, device: torch.device, elapsed: float, stop: bool) -> tuple[float, bool]:
    """The slowest process's clock and whether any process was asked to stop, the same everywhere."""
    if not world.is_distributed:
        return elapsed, stop
    t = torch.tensor([elapsed, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t[0].item(), bool(t[1].item())


def least(world: World, device: torch.device, value: float) -> float:
    """The smallest of the processes' values. Each counts its time budget from its own start, and
    rank 0 starts last (it makes the run directory): at the first step one rank could find its
    budget spent while another went into the step, to wait in its all-reduce for good."""
    if not world.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def mean(world: World, device: torch.device, value: float) -> float:
    """The mean of `value` over the processes (each step's loss, so all see the whole batch's)."""
    if not world.is_distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def first_differing(world: World, device: torch.device, digest: str) -> int | None:
    """The first process whose `digest` (hex) is not rank 0's, the same answer in every process; None
    when all agree. Each process reads its own copy of the text, on its own machine, so copies that
    differ would train one model on several texts, or fail in DDP with a message about shapes."""
    if not world.is_distributed:
        return None
    mine = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=device)  # (60 bits fit an int64)
    everyone = [torch.zeros_like(mine) for _ in range(world.size)]
    dist.all_gather(everyone, mine)
    return next((rank for rank, d in enumerate(everyone) if d.item() != everyone[0].item()), None)
