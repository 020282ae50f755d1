"""Sampling's decode steps through tfcli's C kernels, on numpy arrays: no torch to import.

`import torch` alone took 2.0-2.5 s on these machines: most of the time before `tfcli sample`
showed its first character. Where the kernels run (tfcli/native.py built them for this CPU), a
step needs nothing of PyTorch: the weights are read from the safetensors file as numpy arrays,
laid out once for decode_matmul.c (`Weights`), and every character costs one call of its
`decode_step`, which runs the layers' matmuls and decode_attention.c's attention (`Decoder`).
A model trained or loaded through PyTorch samples through the same code on such CPUs, so a seed
gives the same text however the model came to be in memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import native
from .config import ROPE_BASE, ModelConfig

MATMUL_SOURCE = Path(__file__).with_name("decode_matmul.c")
ATTENTION_SOURCE = Path(__file__).with_name("decode_attention.c")
MANY_ROWS = 128  # past this many rows, decode_matmul.c's bfloat16 and float32 kernels lose to oneDNN's
KINDS = {"float16": 0, "float32": 1, "bfloat16": 2}  # decode_step's `kind`
FEATURES = {"float16": 1, "float32": 1, "bfloat16": 2}  # features() bits that build each kernel
# kind, wte, weights, idx, L, B, C, F, V, x, work, logits, attention, ring, ring_layer, rkv, rb, rh, cos, sin,
# slot, n, H, scale, threads
STEP_ARGS = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 5 + \
    [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]


@functools.cache
def step_library() -> ctypes.CDLL | None:
    """decode_matmul.c built for this machine, its decode_step ready to call; None without it."""
    lib = native.load(MATMUL_SOURCE)
    if lib is None:
        return None
    try:
        lib.features.restype = ctypes.c_int
        lib.decode_step.argtypes, lib.decode_step.restype = STEP_ARGS, ctypes.c_int
    except AttributeError:  # a library without the functions: not ours
        return None
    return lib


@functools.cache
def attention_step(kv_dtype: str) -> int | None:
    """The address of decode_attention.c's step for keys and values of `kv_dtype`, which
    decode_step calls for each layer; None where it could not be built."""
    lib = native.load(ATTENTION_SOURCE)
    try:
        fn = {"float16": lib.step_f16, "float32": lib.step_f32}[kv_dtype] if lib is not None else None
    except AttributeError:
        return None
    return ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None


def kinds() -> tuple[str, ...]:
    """Weight dtypes decode_step takes here: float16 and float32 where the build has AVX-512 (or
    AVX2 with F16C and FMA), bfloat16 where it has AVX-512 and AVX512_BF16."""
    lib = step_library()
    features = lib.features() if lib is not None else 0
    return tuple(name for name, bit in FEATURES.items() if features & bit)


def amx() -> bool:
    """Whether bfloat16 products run on AMX tiles here (Intel Xeon since Sapphire Rapids, Linux):
    2-3x the AVX512_BF16 kernel's speed for a batch's 16 rows."""
    lib = step_library()
    return bool(lib is not None and lib.features() & 4)


def kv_dtype(dtype: str) -> str:
    """Keys and values are cached in float16 when the weights are half too: a batch's step
    streams them, and half the bytes is most of its speed."""
    return "float16" if dtype in ("float16", "bfloat16") else "float32"


def runs(dtype: str, batch: int) -> bool:
    """Whether a step of `batch` rows of `dtype` weights runs here: kernels built, the dtype
    among `kinds()`, and rows few enough for them (any number in float16, whose products stay in C)."""
    return (dtype in kinds() and attention_step(kv_dtype(dtype)) is not None
            and (batch <= MANY_ROWS or dtype == "float16"))


# A step's multiply-adds from which its kernels share the work among threads. Below, a second thread gained
# nothing and cost 4x when another process kept the other core busy: on a 2-core AVX2 Zen 3 the 0.8M shape
# (0.85M a step) sampled 5,000-5,100 chars/s with two threads and 4,600-5,100 with one; beside a busy loop,
# 1,130 with two and 4,770 with one. The 4.8M shape (5.1M a step) gained 1.8x from the second thread.
PARALLEL_FROM = 2_000_000


def threads() -> int:
    """PyTorch's thread count where it is loaded (a caller may have set it), else OMP_NUM_THREADS
    where set, else this process's physical cores: what PyTorch would take (the kernels gain
    nothing from a core's second hardware thread)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return int(asked) if asked.isdigit() and int(asked) > 0 else native.physical_cores()


def to_dtype(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weights in `dtype`, rounded to nearest even; bfloat16 as its uint16 bit patterns
    (numpy has no bfloat16), which is all the kernels read."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if dtype == "float32":
        return w
    if dtype == "float16":
        return w.astype(np.float16)
    bits = w.view(np.uint32).astype(np.uint64)  # (room for the carry of rounding up)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(w), np.uint16(0x7FC0), rounded)  # (rounding would carry a NaN into the sign)


def pack(w: np.ndarray) -> np.ndarray:
    """A matrix (N, K) in decode_matmul.c's layout: blocks of 16 rows, k-major (N/16, K, 16), N
    padded with zero rows; bfloat16 (uint16) with k in pairs (N/16, K/2, 16, 2), as AVX512_BF16's
    dot product reads them."""
    n, k = w.shape
    blocks = -(-n // 16)
    padded = np.zeros((blocks * 16, k), dtype=w.dtype)
    padded[:n] = w
    if w.dtype == np.uint16:
        return np.ascontiguousarray(padded.reshape(blocks, 16, k // 2, 2).transpose(0, 2, 1, 3))
    return np.ascontiguousarray(padded.reshape(blocks, 16, k).transpose(0, 2, 1))


@dataclass
class Weights:
    """A model's weights as decode_step reads them, in one dtype: the embedding as it is, every
    matrix `pack`ed, with the sqrt(d) of each RMSNorm folded into the matrix that reads its
    output (the kernels normalise rows to unit length)."""

    config: ModelConfig
    dtype: str
    wte: np.ndarray
    matrices: list[np.ndarray]  # per layer: qkv, proj, fc, out; then the head

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], config: ModelConfig, dtype: str) -> Weights:
        root_d = config.n_embd ** 0.5

        def w(name: str, scale: float = 1.0) -> np.ndarray:
            t = np.asarray(state[name], dtype=np.float32)
            return to_dtype(t * np.float32(scale) if scale != 1.0 else t, dtype)
        matrices = []
        for i in range(config.n_layer):
            p = f"blocks.{i}."
            matrices += [pack(w(p + "attn.qkv.weight", root_d)), pack(w(p + "attn.proj.weight")),
                         pack(w(p + "mlp.fc.weight", root_d)), pack(w(p + "mlp.proj.weight"))]
        matrices.append(pack(w("head.weight", root_d)))
        return cls(config, dtype, w("wte.weight"), matrices)


class Decoder:
    """`batch` sequences decoded one position at a time, with keys and values in a ring of
    block_size slots (position p in slot p % block_size: rotary attention depends only on
    distances, so generation runs past the context at a constant cost a character)."""

    def __init__(self, weights: Weights, batch: int):
        cfg = weights.config
        self.weights, self.B, self.T = weights, batch, cfg.block_size
        self.L, self.H, self.C, self.V = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size
        self.F = 4 * cfg.n_embd
        kv = np.float16 if kv_dtype(weights.dtype) == "float16" else np.float32
        self.ring = np.zeros((self.L, 2, batch, self.H, self.T, cfg.head_dim), dtype=kv)
        self.x = np.empty((batch, self.C), dtype=np.float32)
        self.work = np.empty(batch * (4 * self.C + self.F), dtype=np.float32)
        self.slot = np.zeros(1, dtype=np.int64)
        self.addresses = (ctypes.c_void_p * len(weights.matrices))(*(m.ctypes.data for m in weights.matrices))
        self.attention = attention_step(kv_dtype(weights.dtype))
        self.fn, self.kind = step_library().decode_step, KINDS[weights.dtype]
        self.first, self.cos, self.sin = 0, *rotary_tables(4 * self.T, cfg.head_dim)
        self.scale = cfg.head_dim ** 0.5  # keys are cached unit-length (see tfcli.model.cached_step)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, V) after a prompt (its ids, at most block_size of them), the same for every
        sequence: stepped through once, on the first sequence, whose keys and values are then
        copied to the others (the same step as decoding: no second path to agree with)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not 0 < len(ids) <= self.T:
            raise ValueError(f"native_decoder: a prompt of 1 to {self.T} ids, got {len(ids)}")
        for pos in range(len(ids)):
            logits = self._step(ids[pos:pos + 1], pos, rows=1)
        self.ring[:, :, 1:, :, :len(ids)] = self.ring[:, :, :1, :, :len(ids)]
        return np.repeat(logits, self.B, axis=0)

    def decode(self, ids: np.ndarray, pos: int) -> np.ndarray:
        """Logits (B, V) for one new token per sequence at absolute position `pos`."""
        return self._step(np.ascontiguousarray(ids, dtype=np.int64).reshape(-1), pos, rows=self.B)

    def _step(self, ids: np.ndarray, pos: int, rows: int) -> np.ndarray:
        if ids.size != rows:
            raise ValueError(f"native_decoder: {rows} token ids for a step, got {ids.size}")
        cos, sin = self._angles(pos)
        self.slot[0] = pos % self.T
        logits = np.empty((rows, self.V), dtype=np.float32)
        ring = self.ring
        failed = self.fn(self.kind, self.weights.wte.ctypes.data, self.addresses, ids.ctypes.data, self.L, rows,
                         self.C, self.F, self.V, self.x.ctypes.data, self.work.ctypes.data, logits.ctypes.data,
                         self.attention, ring.ctypes.data, ring.strides[0], ring.strides[1] // ring.itemsize,
                         ring.strides[2] // ring.itemsize, ring.strides[3] // ring.itemsize, cos.ctypes.data,
                         sin.ctypes.data, self.slot.ctypes.data, min(pos + 1, self.T), self.H, self.scale,
                         self._threads(rows, min(pos + 1, self.T)))
        if failed == -2:
            raise IndexError(f"native_decoder: a token id outside [0, {self.V})")
        if failed:
            raise MemoryError("decode_matmul: no memory for its working buffers")
        return logits

    def _threads(self, rows: int, n: int) -> int:
        """All of `threads()` for a step of PARALLEL_FROM multiply-adds or more (`n` positions
        attended), else one."""
        C, F = self.C, self.F
        work = rows * (self.L * (4 * C * C + 2 * C * F + 2 * n * C) + self.V * C)
        return threads() if work >= PARALLEL_FROM else 1

    def _angles(self, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """The rotary rows of `pos`, from tables of four contexts that move on when generation
        runs past them (tables that grew with the position would take ~1 KB a character)."""
        if not self.first <= pos < self.first + len(self.cos):
            self.first = pos
            self.cos, self.sin = rotary_tables(4 * self.T, self.weights.config.head_dim, start=pos)
        return self.cos[pos - self.first], self.sin[pos - self.first]


def rms_norm(x: np.ndarray) -> np.ndarray:
    """PyTorch's `F.rms_norm` without a weight: x / sqrt(mean(x^2) + float32's epsilon)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.finfo(np.float32).eps)


def rotary_tables(n: int, head_dim: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (n, head_dim) of positions from `start`: cos|cos and -sin|sin (the kernels rotate
    a head's two halves with them), angles computed in float64 so far positions stay exact."""
    inv_freq = ROPE_BASE ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(start, start + n, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return np.ascontiguousarray(np.concatenate((cos, cos), -1)), np.ascontiguousarray(np.concatenate((-sin, sin), -1))


class NativeModel:
    """A trained model read for sampling without PyTorch: its config, vocabulary, training
    summary and float32 weights as numpy arrays, laid out per dtype on first use (`weights`).
    Where a step needs PyTorch after all (a batch of more rows than the kernels take), `torch()`
    makes the same model as a `tfcli.model.GPT`."""

    def __init__(self, config: ModelConfig, vocab, state: dict[str, np.ndarray], summary: dict, path: Path):
        self.config, self.vocab, self.state, self.summary, self.path = config, vocab, state, summary, path
        self._weights: dict[str, Weights] = {}
        self._torch = None

    @classmethod
    def load(cls, path: Path | str | None = None) -> NativeModel:
        """From a run directory or .safetensors file (None: the latest run), checked as
        `tfcli.load` checks it."""
        from .checkpoint import check_weights, load_checkpoint, resolve_model_path

        ck = load_checkpoint(resolve_model_path(Path(path) if path is not None else None), framework="np")
        check_weights(ck)
        return cls(ck.config, ck.vocab, ck.state_dict, ck.summary, ck.path)

    def num_params(self) -> int:
        return sum(t.size for t in self.state.values())

    def forward(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Logits (T, V), attention weights (layer, head, T, T) and the residual stream after the
        embedding and after each block (T, C each), for one sequence of at most block_size ids:
        `tfcli.model.GPT`'s explicit-softmax path in numpy float32, for `inspect-attention`."""
        cfg, w = self.config, self.state
        T, H, D = len(ids), cfg.n_head, cfg.head_dim
        cos, sin = rotary_tables(T, D)  # (T, D): cos|cos, -sin|sin
        causal = np.tril(np.ones((T, T), dtype=bool))
        x = np.asarray(w["wte.weight"], dtype=np.float32)[np.asarray(ids)]
        states, maps = [x], []
        for i in range(cfg.n_layer):
            p = f"blocks.{i}."
            qkv = (rms_norm(x) @ self._matrix(p + "attn.qkv.weight").T).reshape(T, 3, H, D).transpose(1, 2, 0, 3)
            qk = rms_norm(qkv[:2])
            qk = qk * cos + np.concatenate((qk[..., D // 2:], qk[..., :D // 2]), -1) * sin  # (rotary)
            scores = np.where(causal, qk[0] @ qk[1].transpose(0, 2, 1) * np.float32(D ** -0.5), -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            y = (weights @ qkv[2]).transpose(1, 0, 2).reshape(T, H * D)
            x = x + y @ self._matrix(p + "attn.proj.weight").T
            h = np.maximum(rms_norm(x) @ self._matrix(p + "mlp.fc.weight").T, 0)
            x = x + (h * h) @ self._matrix(p + "mlp.proj.weight").T
            states.append(x)
            maps.append(weights)
        return self.logits_from_hidden(x), np.stack(maps), states

    def logits_from_hidden(self, x: np.ndarray) -> np.ndarray:
        return rms_norm(x) @ self._matrix("head.weight").T

    def _matrix(self, name: str) -> np.ndarray:
        return np.asarray(self.state[name], dtype=np.float32)

    def weights(self, dtype: str) -> Weights:
        if dtype not in self._weights:
            self._weights[dtype] = Weights.from_state(self.state, self.config, dtype)
        return self._weights[dtype]

    def torch(self):
        """The same model in PyTorch (imported now), on the CPU."""
        if self._torch is None:
            import torch

            from .model import GPT
            model = GPT(self.config)
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
            model.vocab, model.summary, model.path = self.vocab, self.summary, self.path
            self._torch = model.eval()
        return self._torch
