"""Where and in what precision to run.

bf16 autocast is a 2x win on CPUs with native bf16 dot products (AVX512_BF16,
AMX) and a many-times loss on CPUs without them, so it is probed, not assumed.
Weights, optimizer state and the loss always stay fp32.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import shutil

import torch

from . import native
from .errors import UsageError, setting


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{setting('device', name)} asked for, but this PyTorch sees no CUDA GPU; use "
                         f"{setting('device', 'cpu')}")
    if device.type == "cuda" and device.index is not None and device.index >= (n := torch.cuda.device_count()):
        raise UsageError(f"{setting('device', name)}: this machine has {n} CUDA GPU{'s' if n > 1 else ''} "
                         f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{setting('device', name)} asked for, but MPS is not available here; use "
                         f"{setting('device', 'cpu')}")
    return device


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 where the hardware computes it natively, else fp32 (fp16 on old GPUs)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and native.cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32 or device.type == "mps":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


COMPILE_WORTH_S = 180.0  # a cold compile costs ~25 s on 2 CPU cores (measured); shorter runs lose by it
COMPILE_WORTH_STEPS = 2000


def should_compile(device: torch.device, asked: bool | None, seconds: float | None = None,
                   steps: int | None = None) -> bool:
    """torch.compile when asked, or by default for runs long enough to repay it, where it works."""
    works = device.type == "cuda" or (device.type == "cpu" and can_compile())
    if asked is not None:
        return asked and works
    # the run ends at whichever limit comes first, so each given must be long enough
    given = [limit >= worth for limit, worth in ((seconds, COMPILE_WORTH_S), (steps, COMPILE_WORTH_STEPS))
             if limit is not None]
    return works and bool(given) and all(given)


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, with PyTorch's on-disk cache of compiled training steps allowed to keep
    graphs holding a custom autograd.Function (`causal_attention`'s), which it skips by
    default: such a Function's forward and backward are traced into the graph, so a change to
    its code is a new graph. Without it, every run of the same shape spent 7 s more before
    its first step."""
    import torch._functorch.config  # not loaded by `import torch`

    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    return torch.compile(model)


def compile_failure(e: BaseException) -> str | None:
    """Why torch.compile could not build a graph, in one line, where `e` is that failure; else None.
    A C++ compiler can be there and not work (macOS without its command-line tools; no Python
    headers), which `can_compile` does not see: the first compiled step finds out."""
    from torch._dynamo.exc import BackendCompilerFailed

    if not isinstance(e, BackendCompilerFailed):
        return None
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def can_compile() -> bool:
    """torch.compile on CPU needs a C++ compiler for its generated kernels."""
    return shutil.which("g++") is not None or shutil.which("c++") is not None or shutil.which("clang++") is not None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)
MMAP_FROM = 32 << 20  # glibc's largest allowed threshold on 64-bit machines
TRIM_FROM = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep the memory a step frees, for the next step to reuse.

    PyTorch's CPU tensors come straight from malloc. By default glibc returns big freed blocks
    to the kernel (unmapping them, or trimming the heap), so every training step maps its
    activations and gradients afresh and page-faults through them: 1.5M minor faults in 12
    steps of the 4.8M bench shape. Kept (blocks up to 32 MB from the heap, the heap never
    trimmed below 2 GB of free space), the same steps took 270K faults and ran 16-25% faster
    (4.8M: 6.8-7.5K -> 8.3-8.7K tokens/s; 10.7M: 4-8%). The cost: the process holds on to its
    peak memory until it exits. Process-wide and once; glibc (Linux) only. True when applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_FROM)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_FROM))
