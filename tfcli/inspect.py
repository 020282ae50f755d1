"""Attention extraction and analysis: numbers, not pictures.

Weights come from the model's explicit-softmax path, which tests hold equal to the
fused attention used in training and sampling. A prompt longer than the context is
cut to its last `block_size` characters, as the model would see it when sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError


@dataclass(frozen=True)
class Attention:
    text: str  # the characters the model saw (query = key axis)
    weights: np.ndarray  # (layer, head, query, key), rows sum to 1 over the causal past
    offset: int  # position of text[0] in the full prompt
    logits: np.ndarray  # (query, vocab): the model's next-character logits at each position


def attention(model, text: str) -> Attention:
    """Attention weights of every head for `text` (its last block_size characters)."""
    if not text:
        raise UsageError("the prompt is empty: attention needs at least one character")
    T = model.config.block_size
    offset = max(0, len(text) - T)
    seen = text[offset:]
    ids = torch.as_tensor(model.vocab.encode(seen).astype(np.int64))[None].to(next(model.parameters()).device)
    logits, weights = model.attention(ids)
    return Attention(seen, weights[0].float().cpu().numpy(), offset, logits[0].cpu().numpy())
