"""Corpus text, its character vocabulary, the train/val split and batches.

A character is a Unicode code point, not a byte, so any language works. The
vocabulary is the sorted set of characters in the training text; it travels
inside every checkpoint, so a model never needs its corpus again. Encoding goes
through numpy (UTF-32 code points + a sorted lookup), which keeps large corpora fast.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TfcliError, UsageError

MAX_VOCAB = 20_000  # more distinct characters than any natural-language text needs: likely not text
TEXT_SUFFIXES_SKIPPED = {".safetensors", ".pt", ".bin", ".zip", ".gz", ".png", ".jpg", ".pdf", ".npy"}


def list_files(paths: list[Path]) -> list[Path]:
    """Files named, plus the files under named directories (sorted, hidden ones skipped)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and f.suffix.lower() not in TEXT_SUFFIXES_SKIPPED
            )
            if not found:
                raise UsageError(f"{p}: directory holds no text files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise UsageError(f"{p}: not a regular file")
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def read_text(paths: list[Path], encoding: str = "utf-8", errors: str = "strict") -> str:
    """All files joined in order; refuses binary data with a hint instead of training on it."""
    parts = []
    for f in list_files(paths):
        raw = f.read_bytes()
        if b"\x00" in raw and encoding.lower().replace("-", "") == "utf8":
            raise UsageError(f"{f}: contains NUL bytes, so it is probably not a text file "
                             "(use --encoding if it is UTF-16/32 text)")
        try:
            parts.append(raw.decode(encoding, errors=errors))
        except UnicodeDecodeError as e:
            raise UsageError(f"{f}: not valid {encoding} at byte {e.start}; "
                             "pass --encoding NAME, or --errors replace to substitute bad bytes") from None
        except LookupError:
            raise UsageError(f"unknown encoding {encoding!r}") from None
    text = "".join(parts)
    if not text:
        raise UsageError(f"{', '.join(str(p) for p in paths)}: empty corpus, no text to read")
    return text


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def show_char(c: str) -> str:
    """A character as a reader can see it in a message: repr for control and space characters."""
    if c.isprintable() and not c.isspace():
        return c
    return repr(c)[1:-1] if c != " " else "space"


@dataclass(frozen=True)
class Vocab:
    chars: str  # sorted, distinct

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        chars = "".join(sorted(set(text)))
        if len(chars) > MAX_VOCAB:
            raise UsageError(f"{len(chars):,} distinct characters: too many for a character model "
                             f"(limit {MAX_VOCAB:,}); is this a binary file?")
        return cls(chars)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def _table(self) -> np.ndarray:
        return _codepoints(self.chars)

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` this vocabulary lacks, in order of first appearance."""
        known = set(self.chars)
        return list(dict.fromkeys(c for c in text if c not in known))

    def encode(self, text: str) -> np.ndarray:
        """Token ids (uint16/int32) for `text`; raises naming any character the model never saw."""
        missing = self.unknown(text)
        if missing:
            shown = " ".join(show_char(c) for c in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise UsageError(f"the model's vocabulary has no {shown}{more}; "
                             "remove those characters")
        ids = np.searchsorted(self._table, _codepoints(text))
        return ids.astype(np.uint16 if len(self) <= 65535 else np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def closest(self, c: str) -> str | None:
        """The known character most like `c` (case-folded, accent-stripped), or None."""
        for cand in (c.lower(), c.upper(), unicodedata.normalize("NFKD", c)[:1], " " if c.isspace() else ""):
            if cand and cand in self.chars:
                return cand
        return None


@dataclass(frozen=True)
class Corpus:
    vocab: Vocab
    train: np.ndarray  # token ids
    val: np.ndarray
    digest: str  # sha256 of the training text, checked on --resume
    n_chars: int


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def load_corpus(paths: list[Path], val_paths: list[Path] | None = None, val_fraction: float = 0.1,
                encoding: str = "utf-8", errors: str = "strict", vocab: Vocab | None = None) -> Corpus:
    """Read, build the vocabulary (or reuse one, for --resume) and split.

    The default split holds out the *last* `val_fraction` of the text, as nanoGPT does,
    so validation text is never seen in training. With `val_paths` all text trains.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    text = read_text(paths, encoding, errors)
    val_text = read_text(val_paths, encoding, errors) if val_paths else None
    if val_text is None:
        cut = len(text) - int(len(text) * val_fraction)
        text, val_text = text[:cut], text[cut:]
    if vocab is None:
        vocab = Vocab.from_text(text + val_text)
    else:
        missing = vocab.unknown(text + val_text)
        if missing:
            shown = " ".join(show_char(c) for c in missing[:10])
            raise TfcliError(f"the corpus has characters the run's vocabulary lacks ({shown}); "
                             "it is not the corpus this run trained on")
    return Corpus(vocab, vocab.encode(text), vocab.encode(val_text), text_digest(text), len(text) + len(val_text))
