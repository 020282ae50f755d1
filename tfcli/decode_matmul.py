"""The cached steps' matmuls in C (decode_matmul.c), on weights laid out once per cache.

A decode step multiplies a row or a few by every weight matrix, which PyTorch's CPU kernels do at
a fraction of the speed the cache delivers the weights. `Packed(w)` lays a float16, float32 or
bfloat16 matrix out for decode_matmul.c and is then called like a linear layer. `dtypes()` says
which weight dtypes this machine's build can multiply (none without AVX2 or AVX-512, a C
compiler, or with TFCLI_NO_KERNEL=1), and callers keep PyTorch's path for the rest. Sampling on
such CPUs runs whole decode steps in one call of the same library (`tfcli.native_decoder`).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import torch
import torch.nn.functional as F

from . import native_decoder
from .native_decoder import MANY_ROWS  # above this, bfloat16 and float32 products go to PyTorch: see Packed.__call__

UNIT, RELU2 = 1, 2  # decode_matmul.c's flags
# x, w, add, y, M, N, K, flags, threads
ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native_decoder.step_library()
    if lib is None:
        return None
    try:
        for fn in (lib.matmul_f16, lib.matmul_f32, lib.matmul_bf16):
            fn.argtypes = ARGS
            fn.restype = ctypes.c_int
    except AttributeError:  # a library without the functions: not ours
        return None
    return lib


def dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes `Packed` takes here (`native_decoder.kinds`): float16 and float32 where the
    build has AVX-512 (or AVX2 with F16C and FMA), bfloat16 where it has AVX-512 and AVX512_BF16."""
    return tuple(getattr(torch, name) for name in native_decoder.kinds()) if library() is not None else ()


amx = native_decoder.amx


def takes(w: torch.Tensor) -> bool:
    """Whether `Packed(w)` works here: a CPU matrix of a dtype in `dtypes()` (bfloat16: with an even
    number of columns, which pairs of k need)."""
    return (w.dim() == 2 and w.device.type == "cpu" and w.dtype in dtypes()
            and (w.dtype != torch.bfloat16 or w.shape[1] % 2 == 0))


class Packed:
    """A weight matrix (N, K) laid out for decode_matmul.c, applied as `packed(x, add)` = add + x W^T
    in float32. float16 and float32: blocks of 16 columns, k-major (Nb, K, 16); bfloat16: the same
    with k in pairs (Nb, K/2, 16, 2), as AVX512_BF16's dot product reads them. N is padded to a
    block with zero weights."""

    def __init__(self, w: torch.Tensor):
        if not takes(w):
            raise ValueError(f"decode_matmul cannot take a {w.dtype} {tuple(w.shape)} matrix on {w.device} here")
        self.n, self.k = w.shape
        self.dtype, self.weight = w.dtype, w
        w = w.detach()
        bits = w.view(torch.int16).numpy().view(np.uint16) if w.dtype == torch.bfloat16 else w.numpy()
        self.data = torch.from_numpy(native_decoder.pack(bits))  # (the layout's one definition)
        self.fn = {torch.float16: library().matmul_f16, torch.float32: library().matmul_f32,
                   torch.bfloat16: library().matmul_bf16}[w.dtype]

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None, unit: bool = False,
                 relu2: bool = False) -> torch.Tensor:
        """add + f(x W^T), with x's rows first scaled to unit length where `unit` (`tfcli.model.unit`)
        and f = relu(.)^2 where `relu2` (the MLP's activation). Past MANY_ROWS rows (a batch's
        prompt) bfloat16 goes through PyTorch (oneDNN), whose blocked GEMM won there: 4,096 rows
        by (1024, 256) in 6.3 vs 9.0 ms; at 16 rows 0.12 vs 0.05."""
        rows = x.numel() // self.k
        if x.shape[-1] != self.k or (add is not None and add.numel() != rows * self.n):
            added = "" if add is None else f" plus {tuple(add.shape)}"
            raise ValueError(f"decode_matmul: rows {tuple(x.shape)}{added} do not fit a ({self.n}, {self.k}) matrix")
        if self.dtype != torch.float16 and rows > MANY_ROWS:
            y = F.linear((x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30) if unit else x).to(self.dtype),
                         self.weight).float()
            y = torch.relu_(y).square_() if relu2 else y
            return y if add is None else add + y.view(add.shape)
        x = x.float().contiguous()
        y = torch.empty((rows, self.n), dtype=torch.float32)
        if add is not None:
            add = add.float().contiguous()
        failed = self.fn(x.data_ptr(), self.data.data_ptr(), add.data_ptr() if add is not None else None,
                         y.data_ptr(), rows, self.n, self.k, UNIT * unit + RELU2 * relu2, torch.get_num_threads())
        if failed:
            raise MemoryError("decode_matmul: no memory for its working buffers")
        return y.view(*x.shape[:-1], self.n)
