"""Encoded corpora: every character's token id in one flat array, kept on disk for big corpora.

A corpus of CACHE_MIN_BYTES or more is encoded once into a cache directory ($TFCLI_CACHE,
else $XDG_CACHE_HOME/tfcli, else ~/.cache/tfcli) under the sha256 of its bytes and reading
options, as raw uint8 ids (vocabularies of up to 256 characters) or uint16; later runs
memory-map that file, so training holds only the pages its batches touch. The ids are
written with plain file writes (not through the map), then renamed into place with their
metadata written last, so an interrupted encoding leaves no entry that looks complete. A
lock lets the processes of a torchrun job wait for one of them to encode.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import cache_dir as default_cache_dir
from .errors import TfcliError

CACHE_MIN_BYTES = 16 << 20  # smaller corpora encode in well under a second: kept in memory, never cached
# bump FORMAT when the cache layout or the meaning of its ids changes (2: UTF-8 byte-order marks dropped;
# 3: line ends read as \n)
FORMAT = 3

Sink = Callable[[np.ndarray], None]  # takes the next run of ids, in order


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id (the vocabulary is at most 20,000 characters)."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16)


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # every character's id: the training text, then the validation text
    vocab: str  # the sorted characters the ids index
    cut: int  # ids[:cut] is the training text
    digest: str  # sha256 of the training text (UTF-8)


class MemoryStore:
    """Ids in an in-memory array, for corpora too small to be worth a cache file, or any corpus
    where the cache directory (`unwritable`) cannot be written."""

    def __init__(self, unwritable: Path | None = None):
        self.unwritable = unwritable

    def lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def get(self, key: str) -> Encoded | None:
        return None

    def put(self, key: str, vocab: str, cut: int, n: int, fill: Callable[[Sink], str]) -> Encoded:
        ids = np.empty(n, dtype=ids_dtype(len(vocab)))
        pos = 0

        def sink(chunk: np.ndarray) -> None:
            nonlocal pos
            ids[pos:pos + len(chunk)] = chunk
            pos += len(chunk)

        return Encoded(ids, vocab, cut, fill(sink))


class TokenCache:
    """Ids in `root/<key>.tokens`, described by `root/<key>.json`, opened as read-only memory maps."""

    def __init__(self, root: Path | None = None):
        self.root = root if root is not None else default_cache_dir()

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.tokens", self.root / f"{key}.json"

    def writable(self) -> bool:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "lock").open("a").close()
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process of a machine encodes at a time; the others then find its entry."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = (self.root / "lock").open("a")
        except OSError as e:
            raise TfcliError(f"cannot write the token cache in {self.root} ({e.strerror}); "
                             "set TFCLI_CACHE to a writable directory") from None
        with handle:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock, so concurrent runs may each encode
                yield
                return
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> Encoded | None:
        ids_path, meta_path = self._paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                return None
            return _mapped(ids_path, meta)
        except (OSError, ValueError, KeyError):
            return None  # absent, or damaged outside tfcli: encode again

    def put(self, key: str, vocab: str, cut: int, n: int, fill: Callable[[Sink], str]) -> Encoded:
        ids_path, meta_path = self._paths(key)
        tmp = ids_path.with_name(f"{ids_path.name}.{os.getpid()}.tmp")
        dtype = ids_dtype(len(vocab))
        try:
            with tmp.open("wb") as f:
                digest = fill(lambda chunk: chunk.astype(dtype, copy=False).tofile(f))
                if f.tell() != n * dtype.itemsize:
                    raise TfcliError("the corpus changed while it was being read; run again")
            os.replace(tmp, ids_path)
            meta = {"format": FORMAT, "vocab": vocab, "n": n, "cut": cut, "digest": digest}
            meta_tmp = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
            meta_tmp.write_text(json.dumps(meta), encoding="utf-8")
            os.replace(meta_tmp, meta_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise TfcliError(f"cannot write the token cache in {self.root} ({e.strerror}); "
                             "free some space or set TFCLI_CACHE to another directory") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _mapped(ids_path, meta)


def _mapped(ids_path: Path, meta: dict) -> Encoded:
    dtype = ids_dtype(len(meta["vocab"]))
    if ids_path.stat().st_size != meta["n"] * dtype.itemsize:
        raise ValueError(f"{ids_path}: size does not match its metadata")
    ids = np.memmap(ids_path, dtype=dtype, mode="r", shape=(meta["n"],))
    if meta["n"] and int(ids.max()) >= len(meta["vocab"]):  # bytes damaged since: an id past the vocabulary
        raise ValueError(f"{ids_path}: holds ids its vocabulary lacks")  # (one pass; hashing the corpus took one)
    return Encoded(ids, meta["vocab"], meta["cut"], meta["digest"])


def release(ids: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped array that reads have touched; they stay in the page cache.

    A page fault maps a whole large folio of the file (about a megabyte per window read, measured
    on Linux 6.18), so random batches would grow a run's resident memory towards the corpus size.
    Unmapping after each batch costs ~0.05 ms (nanoGPT re-creates its memmap for the same reason).
    """
    base = ids
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def store_for(n_bytes: int) -> MemoryStore | TokenCache:
    """Memory for small corpora; the cache directory for those worth encoding only once, where it
    can be written (else memory again: a read-only home should not stop a run)."""
    if n_bytes < CACHE_MIN_BYTES:
        return MemoryStore()
    cache = TokenCache()
    return cache if cache.writable() else MemoryStore(unwritable=cache.root)
