"""What `tfcli.train` reports to its callback: small frozen records, one per kind of news.

Kept apart from the training loop so that a renderer (or a notebook) can handle them
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class Start:
    run_dir: Path
    n_params: int
    model: ModelConfig
    train: TrainConfig
    device: str
    dtype: str
    train_chars: int
    val_chars: int
    vocab_size: int
    start_step: int
    compiled: bool
    processes: int = 1  # data-parallel processes under torchrun, each on its share of every batch


@dataclass(frozen=True)
class Step:
    """Progress for a display, about twice a second (and at a session's first and last steps): loss and
    tokens/s are means over the steps since the last one. metrics.jsonl has every step's own."""

    step: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed: float
    progress: float  # 0..1 of whichever budget ends first


@dataclass(frozen=True)
class Eval:
    step: int
    val_loss: float | None
    train_loss: float
    best: bool
    elapsed: float


@dataclass(frozen=True)
class Sample:
    step: int
    text: str


@dataclass(frozen=True)
class Notice:
    message: str


@dataclass(frozen=True)
class Done:
    step: int
    val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    run_dir: Path
    reason: str  # "steps" | "epochs" | "time" | "interrupted"
    best_step: int | None = None  # where best.safetensors was saved
    val_step: int | None = None  # where val_loss was measured: before `step` when Ctrl-C stopped the run


Event = Start | Step | Eval | Sample | Notice | Done
