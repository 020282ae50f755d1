"""The optimizer: AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon orthogonalises each hidden matrix's update (Newton-Schulz iterations), which
trains transformers in fewer steps than AdamW; embeddings, the head and vectors
stay on AdamW, as in the modded-nanogpt speedrun. With "match_rms_adamw" scaling
the two share one learning rate, so `--lr` means the same thing for both.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.optim.adamw import adamw as adamw_update

from . import native
from .config import TrainConfig


class ParamGroups:
    """The part of torch.optim.Optimizer tfcli's optimizers use: groups of parameters with their
    settings, and a state per parameter (what GradScaler and a resume read and write).

    torch's base class imports torch._dynamo the first time any of its methods runs, for
    compiled optimizers: 1.5 s of a run that compiles nothing, as long as `import torch`
    itself, and 2.5% of the default one-minute budget on a CPU without bfloat16.
    """

    def __init__(self, params, defaults: dict):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.defaults = defaults
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: defaultdict[torch.Tensor, dict] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()


class AdamW(ParamGroups):
    """torch.optim.AdamW's update and state (`step`, `exp_avg`, `exp_avg_sq` per parameter),
    through torch's own functional form, fused where `fused` says the device has the kernel."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, fused: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            adamw_update(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                         [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                         fused=self.fused, amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
                         lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # where torch keeps it: the fused kernel reads `step` on the parameter's device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


class Optimizers:
    """Several optimizers driven as one: a shared lr schedule, step, zero_grad and state."""

    def __init__(self, *optimizers: ParamGroups):
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


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of the modded-nanogpt speedrun


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An approximately orthogonal matrix with g's singular vectors, for a stack (n, rows, cols), in `dtype`.

    The iteration pushes every singular value towards 1 (into roughly [0.7, 1.2]), which is
    all Muon needs, so bf16 is precise enough where the hardware has it; it runs on the wide
    orientation, where the Gram matrix is smaller.
    """
    tall = g.size(-2) > g.size(-1)
    x = g.to(dtype)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    x = _through_gram(x, steps) if uses_gram(x, dtype) else _through_x(x, steps)
    return x.mT if tall else x


def uses_gram(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the iteration runs on the Gram matrix alone: for a wide x (m rows, n ≥ 2m columns)
    in float32 or wider.

    Five steps on x cost 20·m²·n + 10·m³ flops; on the Gram matrix, 4·m²·n + 34·m³ (x is read
    twice, at the start and the end), which is less from n = 1.5·m. (`newton_schulz` hands it a
    tall stack transposed, so the rule covers both orientations.) On a 2-core AVX2 Zen 3 in
    float32 the stacks of nanoGPT's 0.8M / 4.8M / 10.7M shapes took 17.5 / 155 / 448 ms against
    24.4 / 260 / 709. bf16 is excluded: its rounding compounds through the Gram powers, and with
    singular values spread over four decades the answer was off by 100-320% of its norm, against
    9-11% for the iteration on x (float32: 0.008-0.024% over 4 to 10 decades, against under 0.001%).
    """
    return dtype in (torch.float32, torch.float64) and x.size(-1) >= 2 * x.size(-2)


def _through_x(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _through_gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iterates, by algebra: each step multiplies x by p(A) = a·I + b·A + c·A², A = x·xᵀ,
    and a polynomial in A commutes with A, so the next Gram matrix is p(A)·A·p(A) and x_k is
    x_0 times the product of the p's: all m x m work but the two products with x_0."""
    if steps <= 0:
        return x
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.mT
    total = None
    for k in range(steps):
        p = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        total = p if total is None else p @ total
        if k < steps - 1:
            gram = p @ gram @ p
    return total @ x


class Muon(ParamGroups):
    """Nesterov momentum, then an orthogonalised update, for hidden matrices.

    Same maths as torch.optim.Muon with adjust_lr_fn="match_rms_adamw" (the update's RMS
    matches AdamW's, so one --lr serves both optimizers), but matrices of equal shape are
    orthogonalised as one batch: torch's version goes one matrix at a time, and on a CPU
    with small matrices those calls were 44% of a 0.8M-parameter step.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.95, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        by_shape: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            by_shape[tuple(p.shape)].append(p)
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for shape, ps in by_shape.items():
            buf = self._momentum(ps)
            update = torch.stack([p.grad for p in ps])
            buf.lerp_(update, 1 - momentum)
            update.lerp_(buf, momentum)  # Nesterov
            ortho = newton_schulz(update, group["ns_steps"], self.ns_dtype)
            if decay:
                torch._foreach_mul_(ps, 1 - lr * decay)
            torch._foreach_add_(ps, ortho.unbind(0), alpha=-lr * 0.2 * math.sqrt(max(shape)))

    def _momentum(self, ps: list[torch.Tensor]) -> torch.Tensor:
        """The momentum buffers of `ps` as one stacked tensor whose slices are their states.

        One lerp then updates all of them, where a call per matrix for each element-wise pass
        made the step 16% (0.8M parameters) and 13% (4.8M) slower, for the same numbers. Rebuilt
        from the states when they are not that stack's slices (the first step, a resume, a
        parameter without a gradient)."""
        bufs = [self.state[p].get("momentum_buffer") for p in ps]
        stack = getattr(bufs[0], "_base", None)
        if stack is not None and len(stack) == len(ps) and all(
                b is not None and b._base is stack and b.data_ptr() == row.data_ptr() for b, row in zip(bufs, stack)):
            return stack
        stack = torch.stack([torch.zeros_like(p) if b is None else b for b, p in zip(bufs, ps)])
        for p, row in zip(ps, stack.unbind(0)):
            self.state[p]["momentum_buffer"] = row
        return stack


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively; float32 on CPUs without AVX512_BF16 or AMX.

    There PyTorch emulates bf16 products: on a 2-core AVX2 Zen 3, a 256 x 256 bf16 matmul ran at
    1.2 GFLOP/s against float32's 123, and one Newton-Schulz call of the 0.8M shape's four
    128 x 384 matrices took 200 ms: `--time 60` trained 40 steps to a val loss of 2.51, and 145
    to 2.00 with float32 here.
    """
    if device.type == "cpu" and not native.cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and name.startswith("blocks.")


EMBEDDING_LR_SCALE = 10.0


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """Weight decay on hidden matrices only; never on embeddings' rows or the head.

    With Muon, the input embedding learns at EMBEDDING_LR_SCALE x --lr (as in the modded-nanogpt
    speedrun, whose embedding lr is 12x Muon's): its rows start at unit scale and each moves only
    when its character is in the batch. At the 5-minute tinyshakespeare budget, one run each:
    5x 1.495, 10x 1.493, 20x 1.502, against 1.506-1.508 at 1x; five more runs at 10x: 1.495-1.504.
    The trainer multiplies each group's scheduled lr by its `lr_scale`.
    """
    fused = device.type in ("cpu", "cuda")
    named = list(model.named_parameters())
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other = [p for n, p in named if not is_hidden_matrix(n, p)]
    if cfg.optimizer == "muon":
        muon = Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=newton_schulz_dtype(device))
        embedding = [p for n, p in named if n == "wte.weight"]
        # embedding first: parameters keep the order they had in one group, which resume state follows
        groups = [{"params": embedding, "lr": cfg.lr * EMBEDDING_LR_SCALE, "lr_scale": EMBEDDING_LR_SCALE},
                  {"params": [p for p in other if all(p is not e for e in embedding)]}]
        adam = AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
        return Optimizers(muon, adam)
    groups = [{"params": hidden, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return Optimizers(AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused))
