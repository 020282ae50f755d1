"""Run directories and checkpoints: safetensors only, written atomically.

A run directory holds
  model.safetensors  the latest weights, with config, vocabulary and a training summary
                     in the header metadata: enough to sample with nothing else
  best.safetensors   the weights with the lowest validation loss so far
  state.safetensors  what --resume needs: optimizer moments, step, clock, RNG states
  metrics.jsonl      one JSON object per logged step / evaluation

Loading never unpickles: safetensors is a JSON header plus raw tensor bytes, so a
checkpoint cannot run code. Every write goes to a temp file, is fsynced, then
renamed over the old one, so a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .corpus import Vocab
from .errors import TfcliError, UsageError, at_command_line, command_line, setting

if TYPE_CHECKING:  # (imported where used: sampling reads checkpoints without PyTorch)
    import torch

FORMAT = "tfcli"
FORMAT_VERSION = 1
MODEL_FILE, BEST_FILE, STATE_FILE = "model.safetensors", "best.safetensors", "state.safetensors"
METRICS_FILE = "metrics.jsonl"
RUNS_DIR = Path("runs")


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old file or the new one, never a torn one. Through a
    symbolic link to where it points, and with the mode of the file it replaces (a private file
    stays private)."""
    path = path.resolve() if path.is_symlink() else path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:64]}.", suffix=".tmp")  # (names <= 255)
    try:
        os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f".{glob.escape(path.name[:64])}.*.tmp"):  # left by a writer killed mid-save
        stale.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Tensors go to the CPU and contiguous memory first: the file records no device, so a
    checkpoint written on a GPU loads on a CPU (and back) with no conversion step."""
    import torch
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # a diverged run must not overwrite the last good checkpoint with NaNs
        raise TfcliError(f"not writing {path}: {bad} holds NaN or infinite values (training diverged); "
                         "earlier checkpoints are untouched")
    try:
        atomic_write(path, st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), **meta}))
    except OSError as e:
        raise TfcliError(f"cannot write {path}: {e.strerror or e}; earlier checkpoints are untouched") from None


def _open(path: Path, framework: str = "pt"):
    """`path` opened for reading, its tensors as PyTorch's ("pt") or numpy's ("np")."""
    if not path.is_file():
        raise UsageError(f"{path}: {'not a regular file' if path.exists() else 'no such checkpoint file'}")
    try:
        return safe_open(str(path), framework=framework, device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure (SafetensorError, OSError, ...) means "not ours"
        if _looks_pickled(path):
            raise TfcliError(f"{path}: a pickle (what torch.save writes to .pt files), not safetensors; "
                             "tfcli never loads pickled files, since unpickling can run code") from None
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        why = why if len(why) <= 100 else why[:99].rsplit(" ", 1)[0] + "…"  # (cut at a word, and said to be)
        raise TfcliError(f"{path}: not a readable safetensors file ({why})") from None


def _looks_pickled(path: Path) -> bool:
    """torch.save writes a zip (PK) of pickles, or (before 1.6) a bare pickle (protocol 2+ starts with 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _check_meta(path: Path, meta: dict | None) -> dict:
    meta = meta or {}
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: a safetensors file, but not a tfcli checkpoint")  # (2, as any other non-checkpoint)
    version = meta.get("format_version", "0")
    if not version.isdigit():
        raise TfcliError(f"{path}: damaged tfcli checkpoint (format version {version!r})")
    version = int(version)
    if version > FORMAT_VERSION:
        raise TfcliError(f"{path}: written by a newer tfcli (format {version}, this one reads "
                         f"{FORMAT_VERSION}); upgrade tfcli")
    return meta


@dataclass
class Checkpoint:
    config: ModelConfig
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]
    summary: dict  # training summary: step, val_loss, tokens, seconds, corpus...
    path: Path


def save_model(path: Path, model: torch.nn.Module, vocab: Vocab, summary: dict) -> None:
    meta = {"config": json.dumps(model.config.to_dict()), "vocab": json.dumps(vocab.chars),
            "summary": json.dumps(summary)}
    _save(path, {k: v.float() for k, v in model.state_dict().items()}, meta)


def load_checkpoint(path: Path, framework: str = "pt") -> Checkpoint:
    """The checkpoint at `path`, its tensors as PyTorch's ("pt") or as numpy arrays ("np", for
    `tfcli.native_decoder`, which samples without importing torch)."""
    with _open(path, framework) as f:
        meta = _check_meta(path, f.metadata())
        if "state" in meta and "config" not in meta:
            raise UsageError(f"{path}: the optimizer state that resuming a run reads, not a model; "
                             f"give its run directory or {MODEL_FILE}")
        try:
            config = ModelConfig.from_dict(json.loads(meta["config"]))
            chars, summary = json.loads(meta["vocab"]), json.loads(meta.get("summary", "{}"))
            if not isinstance(chars, str) or not isinstance(summary, dict):
                raise TypeError("its vocab must be a string and its summary an object")
            vocab = Vocab(chars)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, ValueError, TypeError, SafetensorError) as e:
            raise TfcliError(f"{path}: damaged tfcli checkpoint ({e})") from None
    sizes = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")
    if not all(type(getattr(config, name)) is int for name in sizes) or type(config.dropout) not in (int, float):
        raise TfcliError(f"{path}: damaged tfcli checkpoint (its config: {meta['config'][:100]})")
    try:
        with command_line(on=False):
            config.validate()  # (a shape no model has: it would sample garbage, or fail mid-step)
    except UsageError as e:
        raise TfcliError(f"{path}: damaged tfcli checkpoint (its config: {e.message})") from None
    if config.vocab_size != len(vocab):
        raise TfcliError(f"{path}: damaged tfcli checkpoint (vocabulary does not match config)")
    bad = non_finite(tensors)
    if bad is not None:  # training never saves such weights: the bytes were damaged since
        raise TfcliError(f"{path}: damaged tfcli checkpoint (non-finite weights in {bad})")
    return Checkpoint(config, vocab, tensors, summary, path)


def non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor (PyTorch's or numpy's) holding a NaN or an
    infinity, if any."""
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            if t.dtype.kind == "f" and not np.isfinite(t).all():
                return name
        elif t.is_floating_point() and not t.isfinite().all():
            return name
    return None


def save_state(path: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    _save(path, tensors, {"state": json.dumps(state)})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with _open(path) as f:
        meta = _check_meta(path, f.metadata())
        try:
            tensors, state = {k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["state"])
        except (KeyError, ValueError, SafetensorError) as e:
            raise TfcliError(f"{path}: damaged resume state ({e})") from None
    bad = non_finite(tensors)
    if bad is not None:  # (a damaged optimizer moment would show as a diverged loss, with wrong advice)
        raise TfcliError(f"{path}: damaged resume state (non-finite values in {bad}); its run's model is "
                         f"intact, but cannot be resumed: train into a new {setting('run_dir', flag='--out')}")
    return tensors, state


def make_run_dir(run_dir: Path, fresh: bool = True, resumed_at: int | None = None) -> None:
    """Create the run directory, or say in one line why it cannot hold a run (before any training).

    A fresh run in a directory whose earlier run never saved (stopped before its first
    checkpoint) moves that run's metrics aside (metrics.jsonl.prev1, 2...), so one log holds one run;
    one whose earlier run did save is refused (`refuse_finished_run`): its model is not overwritten.
    A run resumed at step `resumed_at` drops the metrics of later steps: a session that failed
    before its save (a full disk) had logged steps the checkpoint does not hold, which this
    session logs again."""
    if fresh:
        refuse_finished_run(run_dir)
    _create(run_dir)
    metrics = run_dir / METRICS_FILE
    if resumed_at is not None and metrics.is_file():
        _trim_metrics(metrics, resumed_at)
    if fresh and metrics.exists():
        aside = next(p for n in itertools.count(1) if not (p := metrics.with_name(f"{METRICS_FILE}.prev{n}")).exists())
        try:
            metrics.rename(aside)
        except OSError as e:
            raise TfcliError(f"cannot move aside the old {metrics}: {e.strerror or e}") from None


def _trim_metrics(path: Path, step: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)  # (bytes: what is kept stays as it was written)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        try:
            atomic_write(path, b"".join(kept))
        except OSError as e:
            raise TfcliError(f"cannot write {path}: {e.strerror or e}; earlier checkpoints are untouched") from None


def _step_of(line: bytes) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError, OverflowError):  # (a line cut by a crash: kept as it is)
        return 0


def refuse_finished_run(run_dir: Path) -> None:
    """A fresh run may not start where a run has saved a model: say so in one line, with the way out
    (in the reader's words: `errors.setting`)."""
    resume = f"{'add' if at_command_line() else 'pass'} {setting('resume', True)} to continue it"
    other = f"pick another {setting('run_dir', flag='--out')}"
    if (run_dir / MODEL_FILE).exists():
        hint = (f"{resume}, or {other}" if (run_dir / STATE_FILE).exists()
                else f"it has no {STATE_FILE} to resume from, so {other}")
        raise UsageError(f"{run_dir} already holds a run; {hint}")
    if left := earlier_files(run_dir):  # (without a model: not resumable, yet the weights are there)
        raise UsageError(f"{run_dir} holds an earlier run's {' and '.join(left)}; {other}, or move them away")
    if foreign := foreign_entries(run_dir):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if foreign[3:] else "")
        raise UsageError(f"{run_dir} holds other things than a run ({shown}); a run needs a new or empty "
                         f"directory: {other}")


def foreign_entries(run_dir: Path) -> list[str]:
    """What `run_dir` holds besides a run's own files. A fresh run is refused there: `-o runs` put its
    files beside runs/names, which `sample` then used instead, and `-o .` would mix them with (and
    could overwrite) the user's own. A run stopped before its first save leaves only its metrics."""
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:  # (not there yet, or not a directory: what makes it says so)
        return []
    return [p.name + "/" * p.is_dir() for p in entries if not _is_run_file(p.name)]


SYSTEM_FILES = ("Thumbs.db", "desktop.ini", "lost+found")  # (and hidden ones: .DS_Store, .ipynb_checkpoints)


def _is_run_file(name: str) -> bool:
    """A run's own files, its leftovers (atomic_write's hidden temporary files), and what a file
    browser or the system leaves in any directory it opens: a stopped run looked at in Finder was
    refused for its .DS_Store."""
    return (name in (MODEL_FILE, BEST_FILE, STATE_FILE, METRICS_FILE, *SYSTEM_FILES) or name.startswith(".")
            or re.fullmatch(re.escape(METRICS_FILE) + r"\.prev\d+", name) is not None)


def earlier_files(run_dir: Path) -> list[str]:
    """Checkpoints an earlier run left in `run_dir` besides its model (a save cut between its files)."""
    return [name for name in (STATE_FILE, BEST_FILE) if (run_dir / name).exists()]


def _create(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # (the user's choice of path: a usage error, as at the CLI)
        raise UsageError(f"{run_dir}: a file is in the way of the run directory; pick another "
                         f"{setting('run_dir', flag='--out')}") from None
    except OSError as e:
        raise TfcliError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise TfcliError(f"cannot write to run directory {run_dir}: permission denied")


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One training at a time in a run directory. Two would both write its checkpoints, the last
    save winning, and interleave their steps in one metrics log. An advisory lock on the
    directory itself (flock), so no lock file joins the run's files, and the kernel drops it
    when the process ends, however it ends. Where there are no such locks (Windows, some network
    filesystems) the run goes on unguarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    created = not run_dir.exists()
    _create(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        if not _try_lock(fcntl, fd):
            raise TfcliError(f"{run_dir} is in use by another tfcli train; wait for it to end, or pick another "
                             f"{setting('run_dir', flag='--out')}")
        yield
    finally:
        os.close(fd)
        if created:  # a run refused before writing anything leaves no empty directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def in_use(run_dir: Path) -> bool:
    """Whether a training holds `run_lock` on this directory now (one that has not saved yet
    leaves no model to see)."""
    try:
        import fcntl
        fd = os.open(run_dir, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        return not _try_lock(fcntl, fd)  # (closing the descriptor releases a lock taken here)
    finally:
        os.close(fd)


def _try_lock(fcntl, fd: int) -> bool:
    """Take the lock of the directory open as `fd`; False when another process holds it. A
    filesystem without locks counts as free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def append_metrics(run_dir: Path, *records: dict) -> None:
    path = run_dir / METRICS_FILE
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
    except OSError as e:
        raise TfcliError(f"cannot write {path}: {e.strerror or e}; earlier checkpoints are untouched") from None


def latest_run(root: Path = RUNS_DIR) -> Path | None:
    found = [p for p in root.glob(f"*/{MODEL_FILE}") if p.is_file()] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def resolve_model_path(path: Path | None) -> Path:
    """A run directory or .safetensors file; None means the most recent run under ./runs, and a
    directory of runs the most recent run in it."""
    if path is None:
        found = latest_run()
        if found is None:
            how = "`tfcli train FILE` or pass -m PATH" if at_command_line() else "tfcli.train, or give a path"
            raise UsageError(f"no trained model found under ./runs; train one with {how}")
        return found
    if path.is_dir():
        if (path / MODEL_FILE).exists() and not (path / MODEL_FILE).is_file():
            raise UsageError(f"{path / MODEL_FILE}: not a regular file")
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        if (path / METRICS_FILE).is_file():  # a run that had not reached its first save
            raise UsageError(f"{path}: a run with no model saved yet (a run saves at its first validation, "
                             "by default after 30 s or 250 steps, and when it ends)")
        if (found := latest_run(path)) is not None:  # a directory of runs, as ./runs is by default
            return found
        raise UsageError(f"{path}: holds no {MODEL_FILE}; is it a run directory?")
    if not path.exists():
        raise UsageError(f"{path}: no such run directory or checkpoint")
    if not path.is_file():  # (a FIFO or a device: reading its first bytes would wait for ever)
        raise UsageError(f"{path}: not a regular file; {_takes()} a run directory or a .safetensors file")
    named = path.suffix.lower() == ".safetensors"  # (then damage is reported as damage)
    if not (named or _looks_safetensors(path) or _looks_pickled(path)):  # a corpus, a log: the wrong file
        raise UsageError(f"{path}: not a checkpoint; {_takes()} a run directory or a .safetensors file")
    return path


def _takes() -> str:
    return "-m takes" if at_command_line() else "give"


def _looks_safetensors(path: Path) -> bool:
    """safetensors files open with their header's length (8 bytes, little-endian), then its JSON;
    by content, so a copy named model.bak still loads (and damage past this is reported as such)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return True  # (opening it says why)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def check_weights(ck: Checkpoint) -> None:
    """A one-line error where the checkpoint's weights are not the ones its config makes."""
    mismatch = _mismatch(ck.config.weight_shapes(), ck.state_dict)
    if mismatch:
        raise TfcliError(f"{ck.path}: damaged tfcli checkpoint (weights do not match its config: {mismatch})")


def _mismatch(expected: dict[str, tuple[int, ...]], found: dict) -> str | None:
    """The first way `found` differs from the weights the config makes, in words (PyTorch's own
    error starts with a line that names no weight)."""
    for name, shape in expected.items():
        if name not in found:
            return f"{name} is missing"
        if tuple(found[name].shape) != shape:
            return f"{name} is {tuple(found[name].shape)}, the config makes {shape}"
    extra = next((name for name in found if name not in expected), None)
    return f"{extra} is not one of its weights" if extra else None


def run_name(corpus_paths: list[Path]) -> str:
    """The corpus's name for its run directory: a file's stem, a directory's own name."""
    first = corpus_paths[0]
    return (first.stem if first.is_file() else first.resolve().name) or "corpus"


def default_run_dir(corpus_paths: list[Path], root: Path = RUNS_DIR) -> Path:
    """runs/<corpus name>, or runs/<name>-2, -3... so an earlier run (or a file of that name) is never
    overwritten."""
    stem = run_name(corpus_paths)
    candidate, n = root / stem, 1
    while (candidate.exists() and not candidate.is_dir()) or (candidate / MODEL_FILE).exists() \
            or earlier_files(candidate) or foreign_entries(candidate) or in_use(candidate):
        n += 1
        candidate = root / f"{stem}-{n}"
    return candidate


def latest_run_of(corpus_paths: list[Path], root: Path = RUNS_DIR) -> Path:
    """The corpus's latest run: of runs/<name>, runs/<name>-2, -3... (default_run_dir's names), the
    one saved last; runs/<name> where none has saved. What `--resume` without `--out` goes on with."""
    stem = run_name(corpus_paths)
    named = [root / stem] + [p for p in root.glob(f"{glob.escape(stem)}-*") if p.name[len(stem) + 1:].isdigit()]
    saved = [p for p in named if (p / STATE_FILE).is_file()]
    return max(saved, key=lambda p: (p / STATE_FILE).stat().st_mtime) if saved else root / stem


def load_model(path: Path | str | None = None, device: str = "cpu"):
    """A ready-to-use model from a run directory or .safetensors file (None: the latest run).

    The vocabulary and training summary ride along as `model.vocab` and `model.summary`.
    """
    from .device import pick_device
    from .model import GPT

    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"load takes a run directory or a .safetensors file (a str or Path), got {path!r}")
    target = pick_device(device)  # an unavailable device is a one-line error, not a crash mid-load
    ck = load_checkpoint(resolve_model_path(Path(path) if path is not None else None))
    check_weights(ck)
    model = GPT(ck.config)
    model.load_state_dict(ck.state_dict)
    model.vocab, model.summary, model.path = ck.vocab, ck.summary, ck.path
    return model.to(target).eval()
