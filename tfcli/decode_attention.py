"""The cached decode step's attention in C (decode_attention.c), built on first use by `tfcli.native`.

A batch of samples decodes at the speed its keys and values stream from memory: float16 halves
the bytes, and PyTorch has no CPU kernel that reads float16 keys faster than float32 ones. One
sample's step is mostly kernel launches, and this does a layer's per-head work in one call.
Where it cannot be built, `kernel()` is None and the model attends through PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("decode_attention.c")
# qkv, cos, sin, ring, its three strides, slot, n, B, H, D, scale, out, threads
ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 4 + \
    [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]


class Kernel:
    """A loaded build's step_f32 / step_f16 (by the ring's dtype), called on tensors."""

    def __init__(self, lib: ctypes.CDLL):
        self.path = lib._name
        self.fns = {torch.float32: lib.step_f32, torch.float16: lib.step_f16}
        for fn in self.fns.values():
            fn.argtypes, fn.restype = ARGS, None

    def __call__(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ring: torch.Tensor,
                 slot: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention output (B, H*D) of one decode step, from the step's qkv projection (B, 3*H*D):
        QK-norm, rotation by `cos`/`sin` (the position's (1, D) rows of `rotary_tables`), the new key
        and value stored in ring slot `slot` (a one-element int64 tensor), attention to the ring's
        slots [0, n) (`ring`: one layer's (2, B, H, n, D), the whole ring or its filled part)."""
        _, B, H, n, D = ring.shape
        if ring.stride(-1) != 1 or ring.stride(-2) != D or slot.dtype != torch.int64:
            raise ValueError("decode_attention: a ring of (2, B, H, n, D) slots and an int64 slot number")
        qkv, cos, sin = (t.float().contiguous() for t in (qkv, cos, sin))  # (no copies when they are already)
        out = torch.empty((B, H * D), dtype=torch.float32, device="cpu")
        self.fns[ring.dtype](qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), ring.data_ptr(), ring.stride(0),
                             ring.stride(1), ring.stride(2), slot.data_ptr(), n, B, H, D, scale, out.data_ptr(),
                             torch.get_num_threads())
        return out


@functools.cache
def kernel() -> Kernel | None:
    """The kernel for this machine, or None where it could not be built (or TFCLI_NO_KERNEL=1)."""
    lib = native.load(SOURCE)
    try:
        return Kernel(lib) if lib is not None else None
    except AttributeError:  # a library without the functions: not ours
        return None
