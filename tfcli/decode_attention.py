"""The cached decode step's attention in C (decode_attention.c), built on first use.

A batch of samples decodes at the speed its keys and values stream from memory: float16 halves
the bytes, and PyTorch has no CPU kernel that reads float16 keys faster than float32 ones. One
sample's step is mostly kernel launches, and this does a layer's per-head work in one call. A C
compiler is all it takes (the one torch.compile uses); where there is none, or the build fails,
`kernel()` is None and the model attends through PyTorch. TFCLI_NO_KERNEL=1 turns it off.
"""

from __future__ import annotations

import atexit
import contextlib
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
# qkv, cos, sin, ring, its three strides, slot, n, B, H, D, scale, out, threads
ARGS = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 4 + \
    [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]


def flag_sets() -> list[list[str]]:
    """Compiler flags to try, best first. OpenMP only where its runtime is the one PyTorch already
    loaded (Linux wheels carry GNU OpenMP as libgomp.so.1, which a -fopenmp build then shares):
    a second runtime would keep two pools of threads spinning on the same cores (or, with two
    copies of LLVM's, abort the process)."""
    shared = (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists()
    return ([["-O3", "-march=native", "-fopenmp"]] if shared else []) + [["-O3", "-march=native"], ["-O3"]]


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
    """The kernel for this machine, built once per source, compiler and CPU into tfcli's cache
    directory. A build that fails leaves a marker, so that a machine without a working compiler
    tries once, not on every `tfcli sample`."""
    if os.environ.get("TFCLI_NO_KERNEL", "") not in ("", "0"):
        return None
    cc = compiler()
    if cc is None:
        return None
    where = cache_dir()
    if where is None:
        return None
    for flags in flag_sets():
        path = where / f"decode_attention-{build_key(cc, flags)}.so"
        failed = path.with_suffix(".failed")
        if not path.exists():
            if failed.exists():
                continue
            built = build(cc, flags, path)
            if built is not True:
                if built is False:  # the compiler said no: remember; a timeout or a kill may pass next time
                    with contextlib.suppress(OSError):
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


def build(cc: str, flags: list[str], path: Path) -> bool | None:
    """Compile into a temporary file beside `path`, then rename it: concurrent first uses never load
    half a library, and an interrupted build leaves nothing behind. True when built, False when the
    compiler rejected it, None when it could not run to the end (killed, timed out, no space)."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
    except OSError:
        return None
    try:
        done = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, timeout=120)
        if done.returncode == 0:
            os.replace(tmp, path)
            return True
        return False if done.returncode > 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


def cache_dir() -> Path | None:
    """$TFCLI_CACHE, else $XDG_CACHE_HOME/tfcli, else ~/.cache/tfcli; a private temporary directory,
    removed at exit, when that cannot be written (a read-only home), so a build still happens, once
    per process; None when not even that can be made."""
    try:
        root = os.environ.get("TFCLI_CACHE") or \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tfcli"
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        pass
    try:
        path = Path(tempfile.mkdtemp(prefix="tfcli-"))
    except OSError:
        return None
    atexit.register(shutil.rmtree, path, True)  # a loaded library may go: the process keeps its mapping
    return path


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
