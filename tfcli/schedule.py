"""When things happen in a run: the learning rate at each point, the pace of steps, the step that
ends a run, and when to validate.

Pure arithmetic on the clock and the step count, kept apart from the loop that acts on it so each
rule can be read (and tested) on its own. Nothing here touches a model or a tensor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .config import ModelConfig, TrainConfig

if TYPE_CHECKING:
    import torch

    from .corpus import Corpus


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Warmup, stable, then a cooldown shaped 1 - sqrt(fraction done): the lr halves in the first
    quarter of the cooldown and lingers near the floor. At the 5-minute tinyshakespeare budget
    it beat a linear cooldown (see README, "Training")."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    if progress < 1.0 - cfg.cooldown:
        return cfg.lr * warm
    frac = min(1.0, (progress - (1.0 - cfg.cooldown)) / max(cfg.cooldown, 1e-9))
    return cfg.lr * warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * (1.0 - math.sqrt(frac)))


class StepClock:
    """What the next step will take, from the last few steps' times (between the processes' agreed
    clocks, so every process decides alike): the least of the last three, since one may hold a
    validation. A session that `warms_up` spends its first step on it, which tells nothing of the
    rest: a compile, or a GPU loading its kernels and libraries (an H200's 15 s run of a 3.2M
    model, whose steps take milliseconds once warm, stopped after its first)."""

    def __init__(self, warms_up: bool):
        self.last: float | None = None
        self.times: list[float] = []
        self.first_counted = 2 if warms_up else 1

    def next_step(self, elapsed: float, steps_done: int) -> float:
        if self.last is not None and steps_done >= self.first_counted:
            self.times = [*self.times[-2:], elapsed - self.last]
        self.last = elapsed
        return self.estimate

    @property
    def estimate(self) -> float:
        """The next step's time as last reckoned (0.0: not known yet)."""
        return min(self.times, default=0.0)


def schedule_progress(prior: float, elapsed: float, budget: float | None, steps: int, steps_left: int | None) -> float:
    """How far through the lr schedule (0..1) a session is, `elapsed` seconds and `steps` steps in,
    having started at `prior`: its budget and its step limit each take the schedule from there to
    the end, and whichever is further on counts. A finished run resumed for more stays at the end,
    its floor, rather than jumping back to the peak; a fresh run's is steps / max_steps."""
    timed = prior + (1 - prior) * elapsed / budget if budget else 0.0
    counted = prior + (1 - prior) * steps / steps_left if steps_left and steps_left > 0 else prior
    return min(1.0, max(timed, counted))


def step_limit(cfg: TrainConfig, train_chars: int, block_size: int) -> tuple[int | None, str]:
    """The step that ends the run (None: only time does) and which limit sets it: --max-steps, or
    --epochs as the steps whose batches add up to that many passes over the training text."""
    limits = [(cfg.max_steps, "steps")] if cfg.max_steps else []
    if cfg.epochs:
        limits.append((max(1, math.ceil(cfg.epochs * train_chars / (cfg.batch_size * block_size))), "epochs"))
    return min(limits) if limits else (None, "steps")


def steps_to_repay_compile(cfg: TrainConfig, corpus: Corpus, model_cfg: ModelConfig, done: int,
                           device: torch.device) -> int | None:
    """The steps a default compile must pay for itself in: those left before --max-steps ends the
    run, and on a GPU before --epochs does too. A GPU step saves milliseconds: on an H100 the
    default run of tinyshakespeare (10 passes, 613 steps) took 37 s compiled and 28 s eager, to
    the same loss (1.4778 and 1.4755). A CPU step saves a hundred or more, so there even a short
    run of a few passes gains (the medium preset: ~340 against ~470 ms a step)."""
    if device.type == "cuda":
        limit, _ = step_limit(cfg, len(corpus.train), model_cfg.block_size)
    else:
        limit = cfg.max_steps
    return None if limit is None else max(0, limit - done)


def validation_due(since_last: float, elapsed: float, budget: float | None, interval: float | None,
                   steps_since: int = 0, every_steps: int | None = None, steps_left: int | None = None,
                   step_seconds: float = 0.0) -> bool:
    """Every `interval` seconds or every `every_steps` steps, whichever comes first, except within
    half an interval of the time budget's end, where the final validation is about to score the
    model anyway. Seconds pace a CPU run; the step count is for fast devices, where 30 s can be
    dozens of passes over a small corpus and the best model comes and goes between two validations
    (an H200 ran 1,700 steps before its first one). A validation the clock asks for is skipped too
    when the step limit's end is that near (`steps_left` at `step_seconds` each): a --max-steps 30
    run validated at step 29, then at 30."""
    half = (interval or 0.0) / 2
    near_end = budget is not None and budget - elapsed < half
    steps_end_near = steps_left is not None and step_seconds > 0 and steps_left * step_seconds < half
    by_clock = interval is not None and since_last >= interval and not steps_end_near
    by_steps = every_steps is not None and steps_since >= every_steps
    return (by_clock or by_steps) and not near_end
