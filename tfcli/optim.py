"""The optimizer: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon orthogonalises each hidden matrix's update (Newton-Schulz iterations), which
trains transformers in fewer steps than AdamW; embeddings, the head and vectors
stay on AdamW, as in the modded-nanogpt speedrun. With "match_rms_adamw" scaling
the two share one learning rate, so `--lr` means the same thing for both.
"""

from __future__ import annotations

import torch

from .config import TrainConfig


class Optimizers:
    """Several optimizers driven as one: a shared lr schedule, step, zero_grad and state."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_of(self, p: torch.Tensor) -> dict:
        for o in self.optimizers:
            if p in o.state:
                return o.state[p]
        return {}

    def set_state(self, p: torch.Tensor, state: dict) -> None:
        for o in self.optimizers:
            if any(p is q for g in o.param_groups for q in g["params"]):
                o.state[p] = state
                return

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and name.startswith("blocks.")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """Weight decay on hidden matrices only; never on embeddings' rows or the head."""
    fused = device.type in ("cpu", "cuda")
    named = list(model.named_parameters())
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other = [p for n, p in named if not is_hidden_matrix(n, p)]
    if cfg.optimizer == "muon":
        muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
        adam = torch.optim.AdamW(other, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
        return Optimizers(muon, adam)
    groups = [{"params": hidden, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return Optimizers(torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused))
