"""Held-out loss, the way ../shared/BENCHMARKS.md defines it.

The text is cut into consecutive, non-overlapping windows of the model's context;
every character is predicted from the characters before it in its window. The
result is deterministic, unlike an estimate from random batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import check_model
from .device import autocast, keep_freed_memory
from .errors import UsageError
from .memory import windows_that_fit

# Characters a forward scores when no batch size is given: on a 2-core CPU in float32 the rate was
# flat from 1K to 8K a forward and fell beyond (0.8M model: 33K chars/s at 8K, 18K at 128K), as
# the activations outgrow the caches; 8K is the 32 windows of context 256 eval always took.
BATCH_TOKENS = 8192


@dataclass(frozen=True)
class EvalResult:
    chars: int  # characters predicted
    loss: float  # mean cross-entropy, nats per character

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"chars": self.chars, "loss": self.loss, "bpc": self.bpc, "perplexity": self.perplexity}


def batch_windows(config, batch_size: int | None, device: torch.device | str = "cpu") -> int:
    """Windows scored in one forward: `batch_size`, or BATCH_TOKENS' worth, and on a CPU no more than
    half the free memory holds. Linux does not refuse what it cannot hold: `--batch-size 1000000`
    on a big text was to be killed mid-pass. The batch leaves the score alone (to rounding)."""
    rows = batch_size or max(1, BATCH_TOKENS // config.block_size)
    if torch.device(device).type == "cpu":
        rows = min(rows, windows_that_fit(config) or rows)
    return rows


def _long(ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ids.astype(np.int64)) if isinstance(ids, np.ndarray) else ids


@torch.no_grad()
def evaluate(model, ids: np.ndarray | torch.Tensor | Sequence[int], batch_size: int | None = None,
             dtype: torch.dtype = torch.float32, on_progress: Callable[[int], None] | None = None) -> EvalResult:
    """Mean loss over `ids`, `batch_size` windows a forward (see batch_windows); `on_progress(n)` is
    told of each n characters scored. An interrupt (Ctrl-C) carries, as its `partial`, the
    EvalResult of the windows scored before it (None before the first): an hour into a huge text,
    that much was not to be thrown away."""
    check_model(model, "evaluate")
    keep_freed_memory()
    T = model.config.block_size
    device = next(model.parameters()).device
    if isinstance(ids, str):
        raise UsageError("evaluate takes token ids: evaluate(model, model.vocab.encode(text))")
    if not isinstance(ids, (np.ndarray, torch.Tensor)):  # (a list of ids, from a notebook: 1.5 is not cut to 1)
        ids = np.asarray(ids) if len(ids) else np.zeros(0, dtype=np.int64)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size <= 0):
        raise UsageError(f"batch_size must be a positive int or None, got {batch_size!r}")
    floats = isinstance(ids, torch.Tensor) and (ids.is_floating_point() or ids.is_complex())
    data = ids if isinstance(ids, np.ndarray) or floats else ids.long()  # (numpy ids widen a batch at a time)
    if data.ndim != 1 or floats or (isinstance(data, np.ndarray) and data.dtype.kind not in "iu"):
        raise UsageError(f"evaluate takes a 1-D sequence of integer token ids, got {data.dtype} of shape "
                         f"{tuple(data.shape)}")
    if len(data) and not 0 <= int(data.min()) <= int(data.max()) < model.config.vocab_size:
        raise UsageError(f"token ids must be in [0, {model.config.vocab_size}), the model's vocabulary; got "
                         f"{int(data.min())}..{int(data.max())}")
    n = len(data) - 1
    if n < 1:
        raise UsageError("need at least two characters to evaluate")
    was_training = model.training
    model.eval()
    full, total, done = n // T, 0.0, 0
    batch_size = batch_windows(model.config, batch_size, device)
    try:
        for start in range(0, full, batch_size):
            rows = min(batch_size, full - start)
            chunk = _long(data[start * T: (start + rows) * T + 1])
            x = chunk[:-1].view(rows, T).to(device)
            y = chunk[1:].view(rows, T).to(device)
            total, done = total + _summed_loss(model, x, y, device, dtype), done + rows * T
            if on_progress:
                on_progress(rows * T)
        rest = n - full * T
        if rest:
            chunk = _long(data[full * T:])
            x, y = chunk[:-1].view(1, rest).to(device), chunk[1:].view(1, rest).to(device)
            total, done = total + _summed_loss(model, x, y, device, dtype), done + rest
            if on_progress:
                on_progress(rest)
    except KeyboardInterrupt as e:
        e.partial = EvalResult(done, total / done) if done else None
        raise
    finally:  # (an interrupt, or a callback's error, leaves the model as it was)
        model.train(was_training)
    return EvalResult(n, total / n)


def _summed_loss(model, x, y, device, dtype) -> float:
    with autocast(device, dtype):
        logits, _ = model(x)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum").item()
