"""The cached steps' matmuls in C (decode_matmul.c), on weights laid out once per cache.

A decode step multiplies a row or a few by every weight matrix, which PyTorch's CPU kernels do at
a fraction of the speed the cache delivers the weights. `Packed(w)` lays a float16, float32 or
bfloat16 matrix out for decode_matmul.c and is then called like a linear layer. `dtypes()` says
which weight dtypes this machine's build can multiply (none without AVX2 or AVX-512, a C
compiler, or with TFCLI_NO_KERNEL=1), and callers keep PyTorch's path for the rest. `Step` runs a
whole decode step in one call, for small models whose steps are otherwise made of call overhead.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from . import native

SOURCE = Path(__file__).with_name("decode_matmul.c")
MANY_ROWS = 128  # above this, bfloat16 and float32 products go to PyTorch: see Packed.__call__
UNIT, RELU2 = 1, 2  # decode_matmul.c's flags
# x, w, add, y, M, N, K, flags, threads
ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
KINDS = {torch.float16: 0, torch.float32: 1, torch.bfloat16: 2}  # decode_step's `kind`
# kind, wte, weights, idx, L, B, C, F, V, x, work, logits, attention, ring, ring_layer, rkv, rb, rh, cos, sin,
# slot, n, H, scale, threads
STEP_ARGS = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5 + \
    [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE)
    if lib is None:
        return None
    try:
        for fn in (lib.matmul_f16, lib.matmul_f32, lib.matmul_bf16):
            fn.argtypes = ARGS
            fn.restype = ctypes.c_int
        lib.features.restype = ctypes.c_int
        lib.decode_step.argtypes, lib.decode_step.restype = STEP_ARGS, ctypes.c_int
    except AttributeError:  # a library without the functions: not ours
        return None
    return lib


def dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes `Packed` takes here: float16 and float32 where the build has AVX-512 (or AVX2
    with F16C and FMA), bfloat16 where it has AVX-512 and AVX512_BF16."""
    lib = library()
    features = lib.features() if lib is not None else 0
    have = ((1, torch.float16), (1, torch.float32), (2, torch.bfloat16))
    return tuple(d for bit, d in have if features & bit)


def amx() -> bool:
    """Whether bfloat16 products run on AMX tiles here (Intel Xeon since Sapphire Rapids, Linux):
    2-3x the AVX512_BF16 kernel's speed for a batch's 16 rows."""
    lib = library()
    return bool(lib is not None and lib.features() & 4)


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
        blocks = -(-self.n // 16)
        w = F.pad(w.detach(), (0, 0, 0, blocks * 16 - self.n))
        if w.dtype in (torch.float16, torch.float32):
            self.data = w.view(blocks, 16, self.k).transpose(1, 2).contiguous()
            self.fn = library().matmul_f16 if w.dtype == torch.float16 else library().matmul_f32
        else:
            self.data = w.view(blocks, 16, self.k // 2, 2).transpose(1, 2).contiguous()
            self.fn = library().matmul_bf16

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



class Step:
    """A KV cache's whole decode step in one C call (decode_step in decode_matmul.c): embedding,
    every layer's matmuls and attention (decode_attention.c's kernel, called from C), the head.
    Taken where every matrix is `Packed` and the attention kernel runs; see `for_cache`."""

    def __init__(self, weights: tuple, kv: torch.Tensor, n_head: int, attention: ctypes._CFuncPtr):
        wte, layers, head = weights
        self.weights = weights  # (kept alive: C holds their addresses)
        self.kind, self.kv, self.n_head = KINDS[head.dtype], kv, n_head
        self.L, _, self.B, _, self.T, D = kv.shape
        self.C, self.F, self.V = wte.size(1), layers[0][2].n, head.n
        matrices = [w for layer in layers for w in layer] + [head]
        self.addresses = (ctypes.c_void_p * len(matrices))(*(w.data.data_ptr() for w in matrices))
        self.x = torch.empty(self.B, self.C, dtype=torch.float32)  # (whatever torch's default dtype)
        self.work = torch.empty(self.B * (4 * self.C + self.F), dtype=torch.float32)
        self.attention = ctypes.cast(attention, ctypes.c_void_p).value
        self.scale = D ** 0.5  # keys are cached unit-length (see tfcli.model.cached_step)
        self.fn = library().decode_step

    @classmethod
    def for_cache(cls, weights: tuple, kv: torch.Tensor, n_head: int, attention) -> Step | None:
        """The step for these weights and ring, or None where the C step does not apply: a matrix
        not `Packed` (PyTorch's layout or oneDNN's), or no attention kernel for the ring's dtype."""
        wte, layers, head = weights
        matrices = [w for layer in layers for w in layer] + [head]
        if attention is None or kv.device.type != "cpu" or not kv.is_contiguous():
            return None
        if kv.size(2) > MANY_ROWS and head.dtype != torch.float16:  # where `Packed` hands products to PyTorch
            return None
        if not all(isinstance(w, Packed) and w.dtype == head.dtype for w in matrices) or wte.dtype != head.dtype:
            return None
        fn = attention.fns.get(kv.dtype)
        return cls(weights, kv, n_head, fn) if fn is not None else None

    def __call__(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor,
                 n: int) -> torch.Tensor:
        """Logits (B, V) for one new token per sequence (`idx`, B int64), its key and value stored in
        ring slot `slot` (one int64), attending to slots [0, n); cos and sin: its rotary rows (D)."""
        idx, cos, sin = idx.reshape(-1).to(torch.int64).contiguous(), cos.float().contiguous(), sin.float().contiguous()
        if idx.numel() != self.B or slot.dtype != torch.int64:
            raise ValueError(f"decode_matmul.Step: {self.B} token ids and an int64 slot number")
        logits = torch.empty(self.B, self.V, dtype=torch.float32)
        kv = self.kv
        failed = self.fn(self.kind, self.weights[0].data_ptr(), self.addresses, idx.data_ptr(), self.L, self.B,
                         self.C, self.F, self.V, self.x.data_ptr(), self.work.data_ptr(), logits.data_ptr(),
                         self.attention, kv.data_ptr(), kv.stride(0) * kv.element_size(), kv.stride(1),
                         kv.stride(2), kv.stride(3), cos.data_ptr(), sin.data_ptr(), slot.data_ptr(), n,
                         self.n_head, self.scale, torch.get_num_threads())
        if failed == -2:
            raise IndexError(f"decode_matmul.Step: a token id outside [0, {self.V})")
        if failed:
            raise MemoryError("decode_matmul: no memory for its working buffers")
        return logits
