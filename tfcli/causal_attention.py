"""Causal softmax attention for training on a CPU, with a backward written out by hand.

PyTorch's fused CPU attention (`scaled_dot_product_attention`) has a slow backward: at the
default model's shape (16 x 4 heads x 256 x 64, bfloat16) its forward and backward took 32 ms a
layer, a third of a training step. Here the same attention is batched matmuls, which oneDNN runs
near this CPU's bfloat16 peak, in blocks of CHUNK queries that skip the keys the mask hides (a
quarter of the work at 256), with the softmax in float32 and the probabilities kept in the
matmuls' dtype for the backward: 15-19 ms. The backward's products are rounded to that dtype
too, as autograd's would be. The memory is the probabilities' (1/2 to 3/4 of T x T a head, plus
a byte each for a dropout mask), so `model.py` uses it up to MAX_T and the fused kernel beyond.
Dropout masks, here and on the model's residual branches (`dropout`), come from random bytes.
"""

from __future__ import annotations

import torch

CHUNK = 128  # queries a block: at 256 and 512 blocks of 128 beat both 64 and one block
MAX_T = 512  # measured up to here (2.3x the fused kernel's speed at 512); beyond, its memory is the question


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for (B, H, T, D) tensors, in autocast's dtype where it is on;
    with `dropout`, each probability is zeroed with that chance (the rest scaled up), as in
    `scaled_dot_product_attention`."""
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Causal.apply(q, k, v, scale, dropout)
    with torch.autocast(q.device.type, enabled=False):
        return _forward(q, k, v, scale, dropout)[0]  # nothing kept for a backward (evaluation)


def pays(q: torch.Tensor, dropout: float) -> bool:
    """Whether this beats the fused kernel for `q`: in bf16 (autocast) it does, with dropout (cheaper
    masks), and under torch.compile, but not in plain eager float32. On an AVX2 Zen 3 (float32, no
    dropout), the fused kernel's forward and backward were 1.06-1.8x as fast over nanoGPT's three
    shapes and the default 0.8M one (the most at context 64), its forward alone 1.6-2x (evaluation);
    compiled, the same shapes trained 3-9% fewer tokens/s with it."""
    return (dropout > 0 or q.dtype != torch.float32 or torch.is_autocast_enabled(q.device.type)
            or torch.compiler.is_compiling())


def _blocks(T: int):
    """(start, end) of each block of queries; queries in [start, end) see keys [0, end)."""
    return [(i, min(i + CHUNK, T)) for i in range(0, T, CHUNK)]


def _probabilities(scores: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    rows, keys = scores.shape[-2:]
    visible = torch.ones(rows, keys, dtype=torch.bool, device=scores.device).tril(start)
    return (_wide(scores) * scale).masked_fill(~visible, float("-inf")).softmax(-1)


def _forward(q, k, v, scale: float, dropout: float, keep: bool = False):
    """The output, and (where `keep`) each block's probabilities and dropout mask for the backward."""
    probs, kept, outs = [], [], []
    for start, end in _blocks(q.size(-2)):
        p = _probabilities(q[:, :, start:end] @ k[:, :, :end].mT, start, scale).to(q.dtype)
        probs += [p] if keep else []
        if dropout:
            mask = _keep(p.shape, dropout, p.device)
            kept += [mask] if keep else []
            p = _drop(p, mask, dropout)
        outs.append(p @ v[:, :, :end])
    return torch.cat(outs, 2), probs, kept


class _Causal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout: float):
        with torch.autocast(q.device.type, enabled=False):  # dtypes are set by `attend`
            out, probs, kept = _forward(q, k, v, scale, dropout, keep=True)
        ctx.scale, ctx.dropout, ctx.blocks = scale, dropout, len(probs)
        ctx.save_for_backward(q, k, v, out, *probs, *kept)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, *saved = ctx.saved_tensors
        probs, kept = saved[:ctx.blocks], saved[ctx.blocks:] or [None] * ctx.blocks
        d_out = d_out.to(q.dtype)
        # softmax's backward: d_scores = p * (d_p - rowsum(p * d_p)), and rowsum(p * d_p) = rowsum(d_out * out)
        # (d_p: the gradient of the probabilities before dropout, which the sum of either side also holds for)
        delta = (_wide(d_out) * _wide(out)).sum(-1, keepdim=True)
        d_q = []
        d_k = _wide(torch.zeros_like(k))  # keys get a share from every later block
        d_v = _wide(torch.zeros_like(v))
        for p, keep, (start, end) in zip(probs, kept, _blocks(q.size(-2))):
            d_o = d_out[:, :, start:end]
            d_v[:, :, :end] += (p if keep is None else _drop(p, keep, ctx.dropout)).mT @ d_o
            d_p = d_o @ v[:, :, :end].mT
            d_p = d_p if keep is None else _drop(d_p, keep, ctx.dropout)
            d_s = (_wide(p) * (_wide(d_p) - delta[:, :, start:end]) * ctx.scale).to(q.dtype)
            d_q.append(d_s @ k[:, :, :end])
            d_k[:, :, :end] += d_s.mT @ q[:, :, start:end]
        return torch.cat(d_q, 2), d_k.to(k.dtype), d_v.to(v.dtype), None, None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least: the softmax and the sums are never done in half precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _dropped_bytes(dropout: float) -> int:
    """Dropout is drawn from random bytes: it is rounded to 1/256 (0.2 drops 51/256)."""
    return min(255, round(dropout * 256))


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout for the residual branches of CPU training, with `_keep`'s cheaper masks (elsewhere,
    and when p is 0, PyTorch's)."""
    if not p:
        return x
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p)
    return _drop(x, _keep(x.shape, p, x.device), p)


def _keep(shape: torch.Size, dropout: float, device: torch.device) -> torch.Tensor:
    """Which probabilities dropout keeps, from eight random bytes a 64-bit draw: torch.compile's
    CPU code drew one random float an element at 13 ns, which made a 3.2M model's step with
    dropout 0.2 take 1.8x as long as without. Eight to a draw took attention dropout's cost from
    37-41 ms a layer to 8-20, and that step from 617-653 ms to 467-560 (compiled, bf16)."""
    *lead, keys = shape
    words = torch.randint(-2**63, 2**63 - 1, (*lead, -(-keys // 8)), dtype=torch.int64, device=device)
    return words.view(torch.uint8)[..., :keys] >= _dropped_bytes(dropout)


def _drop(x: torch.Tensor, keep: torch.Tensor, dropout: float) -> torch.Tensor:
    return x * keep / (1 - _dropped_bytes(dropout) / 256)
