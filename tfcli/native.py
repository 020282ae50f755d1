"""tfcli's C code (the decode step's kernels), compiled on first use with the system's compiler.

A C compiler is all it takes (the one torch.compile uses), and `pip install` needs none: each
source is built once per machine, source and compiler into tfcli's cache directory, and loaded
with ctypes. Where there is no compiler, or a build fails, `load` returns None and callers take
PyTorch's path. TFCLI_NO_KERNEL=1 turns all of it off.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from . import config

STALE_S = 600  # a temporary build file older than this was left by a process that died mid-build


def flag_sets() -> list[list[str]]:
    """Compiler flags to try, best first. OpenMP only where its runtime is the one PyTorch already
    loaded (Linux wheels carry GNU OpenMP as libgomp.so.1, which a -fopenmp build then shares):
    a second runtime would keep two pools of threads spinning on the same cores (or, with two
    copies of LLVM's, abort the process)."""
    spec = importlib.util.find_spec("torch")  # (found, not imported: see `prepare`)
    shared = bool(spec and spec.origin) and (Path(spec.origin).parent / "lib" / "libgomp.so.1").exists()
    return ([["-O3", "-march=native", "-fopenmp"]] if shared else []) + [["-O3", "-march=native"], ["-O3"]]


_locks: dict[Path, threading.Lock] = {}
_locks_lock = threading.Lock()


def load(source: Path) -> ctypes.CDLL | None:
    """`source` built for this machine, once per source, compiler and CPU. A build that fails
    leaves a marker, so that a machine without a working compiler tries once, not on every
    `tfcli sample`. Safe from several threads: one builds, the others wait for it. Callers load
    after importing torch where they use it, so that an OpenMP build binds to PyTorch's libgomp
    (see flag_sets); `tfcli sample` on a CPU imports no torch, and its build binds the system's
    libgomp (the compiler's own), which PyTorch then shares should it be imported after all."""
    with _lock(source):
        return _load(source)


def _lock(source: Path) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(source, threading.Lock())


@functools.cache
def _load(source: Path) -> ctypes.CDLL | None:
    for path in built(source):
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def built(source: Path) -> Iterator[Path]:
    """`source`'s libraries for this machine, best flags first, each built when first asked for."""
    if os.environ.get("TFCLI_NO_KERNEL", "") not in ("", "0"):
        return
    cc = compiler()
    where = cache_dir() if cc is not None else None
    if where is None:
        return
    remove_stale(where)
    paths = [where / f"{source.stem}-{build_key(cc, flags, source)}.so" for flags in flag_sets()]
    for flags, path in zip(flag_sets(), paths):
        if _exiting.is_set():
            return
        if not path.exists():
            if path.with_suffix(".failed").exists():
                continue
            done = build(cc, flags, source, path)
            # remember a refusal; a kill or a full disk may pass next time; a compiler that hung
            # would hang for every flag set, each waiting out the timeout
            if done == "refused":
                mark_failed([path])
            elif done == "hung":
                mark_failed(paths)
            if done != "built":
                continue
        yield path


def mark_failed(paths: list[Path]) -> None:
    """Builds not to try again on this machine (delete the .failed files to retry them)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.with_suffix(".failed").touch()


load.cache_clear = _load.cache_clear  # (tests: as on a machine that has not looked yet)


def prepare(*names: str) -> list[threading.Thread]:
    """Start building these sources (file names in tfcli's package) in background threads, so
    that a first build runs while PyTorch imports rather than after it: a first-ever `tfcli sample`
    showed its first character after 3.2 s with the two builds in turn. Only builds: loading
    waits for `load`, after torch."""
    threads = [threading.Thread(target=_prepare, args=(Path(__file__).with_name(name),), daemon=True)
               for name in names]
    for thread in threads:
        thread.start()
    return threads


def _prepare(source: Path) -> None:
    with _lock(source):
        next(built(source), None)


def remove_stale(where: Path) -> None:
    """Temporary files of builds whose process died (killed with SIGKILL, or older versions of
    tfcli's on a Ctrl-C), and their directories."""
    with contextlib.suppress(OSError):
        for tmp in where.glob("tmp*"):
            if tmp.stat().st_mtime < time.time() - STALE_S:
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()


def compiler() -> str | None:
    """$CC (a command line, as make takes it: "ccache gcc"), else the system's cc, gcc or clang."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc if cc and shutil.which(program(cc)) else None


def program(cc: str) -> str:
    try:
        return (shlex.split(cc) or [""])[0]
    except ValueError:  # (unbalanced quotes: taken as one name, which will not be found)
        return cc


BUILD_TIMEOUT_S = 120  # a build takes about a second; a compiler still going after this is stuck


def build(cc: str, flags: list[str], source: Path, path: Path) -> str:
    """Compile in a temporary directory beside `path` (the compiler's own temporary files too, as
    its TMPDIR), then rename the library into place: concurrent first uses never load half a
    library, and an interrupted build leaves nothing behind. "built"; "refused" (the compiler said
    no); "hung" (it ran past the timeout); "unfinished" (killed, no space)."""
    try:
        work = tempfile.mkdtemp(prefix="tmp", dir=path.parent)
    except OSError:
        return "unfinished"
    out = os.path.join(work, path.name)
    try:
        done = _run([*shlex.split(cc), *flags, "-shared", "-fPIC", str(source), "-o", out, "-lm"], work)
        if done.returncode == 0:
            os.replace(out, path)
            return "built"
        return "refused" if done.returncode > 0 else "unfinished"
    except subprocess.TimeoutExpired:
        return "hung"
    except (OSError, subprocess.SubprocessError, ValueError):  # (ValueError: shlex on unbalanced quotes)
        return "unfinished"
    finally:
        shutil.rmtree(work, ignore_errors=True)


_building: dict[subprocess.Popen, str] = {}  # builds under way, and their temporary directories
_exiting = threading.Event()  # set at exit: no build starts after it
_building_lock = threading.Lock()


def _run(argv: list[str], work: str) -> subprocess.CompletedProcess:
    """subprocess.run, with the compiler in a process group of its own (its cc1, as and ld are
    stopped with it), writing its temporary files into `work`, and known to `_stop_builds` until
    it has been reaped."""
    with _building_lock:
        if _exiting.is_set():  # (a build thread going on to its next flags while the process exits)
            raise subprocess.SubprocessError("exiting")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "TMPDIR": work}, start_new_session=hasattr(os, "killpg"))
        _building[proc] = work
    try:
        out, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise
    finally:
        if proc.poll() is not None:  # (one still running is left to _stop_builds: a SIGTERM's path)
            with _building_lock:
                _building.pop(proc, None)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _stop(proc: subprocess.Popen) -> None:
    """The compiler and its children, with SIGKILL: the builds may have started while `import_whole`
    held SIGINT and SIGTERM, which their compilers then held too (gcc finished its build through a
    SIGTERM). What they leave is in the build's own directory, which its caller removes."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL) if hasattr(os, "killpg") else proc.kill()
        proc.wait(timeout=5)


@atexit.register
def _stop_builds() -> None:
    """A process that exits mid-build (a Ctrl-C during start-up) takes its compilers and their
    temporary files with it: they ran on after it, and left the files for a later run to clear."""
    with _building_lock:
        _exiting.set()
        building = list(_building.items())
    for proc, work in building:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def cache_dir() -> Path | None:
    """config.cache_dir(); a private temporary directory,
    removed at exit, when that cannot be written (a read-only home), so a build still happens, once
    per process; None when not even that can be made."""
    try:
        path = config.cache_dir()
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


def build_key(cc: str, flags: list[str], source: Path) -> str:
    """Source, compiler (its file: an upgrade is a new key), flags and CPU: -march=native code is
    only valid on the CPU it was built for."""
    h = hashlib.sha256(source.read_bytes())
    compiler = os.stat(shutil.which(program(cc)) or program(cc))
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


@functools.cache
def physical_cores() -> int:
    """The cores this process may run on, a core's hardware threads counted once (Linux's
    topology files; elsewhere every CPU counts)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 products natively (AVX512_BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
