"""The cached decode step's attention in C (decode_attention.c), built on first use.

A batch of samples decodes at the speed its keys and values stream from memory: float16 halves
the bytes, and PyTorch has no CPU kernel that reads float16 keys faster than float32 ones. One
sample's step is mostly kernel launches, and this does a layer's per-head work in one call. A C
compiler is all it takes (the one torch.compile uses); where there is none, or the build fails,
`kernel()` is None and the model attends through PyTorch. TFCLI_NO_KERNEL=1 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
# OpenMP where the compiler has it (not Apple's clang), else one thread
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
# qkv, cos, sin, ring, its three strides, slot, n, B, H, D, scale, out, threads
ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_void_p] + [ctypes.c_long] * 4 + \
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
        ok = ring.stride(-1) == 1 and ring.stride(-2) == D and qkv.is_contiguous() and qkv.dtype == torch.float32
        if not (ok and cos.is_contiguous() and sin.is_contiguous() and slot.dtype == torch.int64):
            raise ValueError("decode_attention: unexpected layout")
        out = torch.empty((B, H * D))
        self.fns[ring.dtype](qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), ring.data_ptr(), ring.stride(0),
                             ring.stride(1), ring.stride(2), slot.data_ptr(), n, B, H, D, scale, out.data_ptr(),
                             torch.get_num_threads())
        return out


@functools.cache
def kernel() -> Kernel | None:
    """The kernel for this machine, built once per source, compiler and CPU into tfcli's cache
    directory. A build that fails leaves a marker, so that a machine without a working compiler
    tries once, not on every `tfcli sample`."""
    if os.environ.get("TFCLI_NO_KERNEL", "") not in ("", "0"):
        return None
    cc = compiler()
    if cc is None:
        return None
    where = cache_dir()
    for flags in FLAG_SETS:
        path = where / f"decode_attention-{build_key(cc, flags)}.so"
        failed = path.with_suffix(".failed")
        if not path.exists() and (failed.exists() or not build(cc, flags, path)):
            failed.touch()
            continue
        try:
            return Kernel(ctypes.CDLL(str(path)))
        except (OSError, AttributeError):
            continue
    return None


def compiler() -> str | None:
    """$CC, else the system's cc, gcc or clang."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc if cc and shutil.which(cc) else None


def build(cc: str, flags: list[str], path: Path) -> bool:
    """Compile into a temporary file beside `path`, then rename it: concurrent first uses never load
    half a library, and an interrupted build leaves nothing behind."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError:
        return False
    try:
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, timeout=120)
        if done.returncode == 0:
            os.replace(tmp, path)
            return True
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        Path(tmp).unlink(missing_ok=True)
    return False


def cache_dir() -> Path:
    """$TFCLI_CACHE, else $XDG_CACHE_HOME/tfcli, else ~/.cache/tfcli; a private temporary directory when
    that cannot be written (a read-only home), so a build still happens, once per process."""
    try:
        root = os.environ.get("TFCLI_CACHE") or \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfcli"
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        pass
    return Path(tempfile.mkdtemp(prefix="tfcli-"))


def build_key(cc: str, flags: list[str]) -> str:
    """Source, compiler (its file: an upgrade is a new key), flags and CPU: -march=native code is
    only valid on the CPU it was built for."""
    h = hashlib.sha256(SOURCE.read_bytes())
    compiler = os.stat(shutil.which(cc) or cc)
    for part in (cc, str(compiler.st_mtime_ns), str(compiler.st_size), " ".join(flags), platform.machine(),
                 cpu_flags()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]
def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()
