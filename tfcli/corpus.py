"""Corpus text, its character vocabulary and the train/val split.

A character is a Unicode code point, not a byte, so any language works. The
vocabulary is the sorted set of characters in the training text; it travels
inside every checkpoint, so a model never needs its corpus again.

Files are streamed in chunks, never held whole: a first pass finds the vocabulary and
the length, a second writes the ids (through numpy: UTF-32 code points and a lookup
table) into a `tokens` store, which keeps big corpora on disk, encoded once and
memory-mapped. The corpus's `train` and `val` are views into that one array.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import os
import re
import stat
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import UsageError, at_command_line, setting
from .tokens import FORMAT, Encoded, MemoryStore, Sink, TokenCache, ids_dtype, store_for

MAX_VOCAB = 20_000  # more distinct characters than any natural-language text needs: likely not text
TEXT_SUFFIXES_SKIPPED = {".safetensors", ".pt", ".bin", ".zip", ".gz", ".png", ".jpg", ".pdf", ".npy"}
RUN_LOG = re.compile(r"metrics\.jsonl(\.prev\d*)?")  # checkpoint.METRICS_FILE and the logs moved aside
CHUNK_BYTES = 4 << 20  # read, decode and encode this much at a time: memory stays flat for any corpus size


def list_files(paths: list[Path], skipped: list[Path] | None = None, nul_free: bool = True) -> list[Path]:
    """Files named, plus the text files under named directories (sorted; hidden ones skipped, and
    the training logs tfcli writes into run directories, so `tfcli train .` twice reads the same
    text). A file under a directory whose first bytes hold a NUL is not text (a program, an image
    without a telling suffix): it joins `skipped` rather than stop the run; a file named outright
    is read, and refused if it is binary."""
    files: list[Path] = []
    for p in paths:
        if str(p) == "-":
            raise UsageError("a corpus cannot come from stdin ('-'); save it to a file and name that")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and f.suffix.lower() not in TEXT_SUFFIXES_SKIPPED and not RUN_LOG.fullmatch(f.name)
            )
            binary = {f for f in found if nul_free and _looks_binary(f)}  # (UTF-16 text holds NULs)
            if skipped is not None:
                skipped.extend(sorted(binary))
            found = [f for f in found if f not in binary]
            if not found:
                raise UsageError(f"{p}: directory holds no text files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():  # (a corpus is read twice, a scan for its vocabulary and then the encoding)
            kind = "a pipe, as <(...) gives" if stat.S_ISFIFO(p.stat().st_mode) else "a device or a socket"
            raise UsageError(f"{p}: not a regular file ({kind}); save the text to a file and name that")
        elif p.is_symlink():
            raise UsageError(f"{p}: a symbolic link to nothing that exists (or a loop of links)")
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def wide_text(f: Path) -> bool:
    """Whether `f` opens with a UTF-16 or UTF-32 byte-order mark: text that a NUL test calls binary."""
    try:
        with f.open("rb") as fh:
            return fh.read(4).startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_BE))
    except OSError:
        return False


def _looks_binary(f: Path, n: int = 8192) -> bool:
    """A NUL in the first `n` bytes: git's test for binary files (UTF-8 text never holds one)."""
    try:
        with f.open("rb") as fh:
            return b"\x00" in fh.read(n)
    except OSError:
        return False  # unreadable: reading it later says why


def read_text(paths: list[Path], encoding: str = "utf-8", errors: str = "strict") -> str:
    """All files joined in order, or standard input for the one path `-`; refuses binary data with
    a hint instead of training on it."""
    if any(str(p) == "-" for p in paths):
        if len(paths) > 1:
            raise UsageError("'-' (stdin) is given once and alone, not with files")
        text = _decode_stdin(encoding, errors)
    else:
        files = list_files(paths, nul_free=_nul_free(encoding))
        text = "".join(piece for _, piece in iter_text(files, encoding, errors))
    if not text:
        raise UsageError(f"{source_names(paths)}: empty corpus, no text to read")
    return text


def encode_text(paths: list[Path], vocab: Vocab, encoding: str = "utf-8", errors: str = "strict",
                skipped: Counter | None = None, max_chars: int | None = None) -> np.ndarray:
    """The ids of the files' text (of stdin for the one path `-`), read and encoded a chunk at a
    time: a big file costs its ids' 2 bytes a character, not a Python string and its code
    points (`eval` held 14x a 200 MB file's size); a tqdm bar on a terminal shows the reading.
    A character the vocabulary lacks is refused, or, given a `skipped` Counter, dropped and
    counted there (one unknown character had kept a whole file from being scored). `max_chars`:
    stop reading once that many are encoded (a sample of a huge text)."""
    if any(str(p) == "-" for p in paths):
        return _known_ids(read_text(paths, encoding, errors), vocab, paths, skipped)[:max_chars]
    files = list_files(paths, nul_free=_nul_free(encoding))
    total = sum(f.stat().st_size for f in files)
    out = np.empty(total, dtype=np.uint16 if len(vocab) <= 65535 else np.int32)  # (a character takes a byte or more)
    n = 0
    with _bar(total, "reading") as bar:
        for f in files:  # (one at a time, so that an unknown character's file is the one named)
            for n_bytes, text in iter_text([f], encoding, errors):
                ids = _known_ids(text, vocab, [f], skipped)
                if n + len(ids) > len(out):  # (an encoding of under a byte a character: none we know)
                    out = np.concatenate([out[:n], np.empty(n + len(ids), dtype=out.dtype)])
                out[n:n + len(ids)] = ids
                n += len(ids)
                bar.update(n_bytes)
                if max_chars is not None and n >= max_chars:
                    return out[:max_chars]
    if n == 0 and skipped:
        raise UsageError(f"{source_names(paths)}: every character was skipped (none is in the model's vocabulary)")
    if n == 0:
        raise UsageError(f"{source_names(paths)}: empty corpus, no text to read")
    return out[:n]


def _known_ids(text: str, vocab: Vocab, paths: list[Path], skipped: Counter | None = None) -> np.ndarray:
    ids = vocab.ids(text)
    if ids is not None:
        return ids
    missing = vocab.unknown(text)
    if skipped is None:
        skip = "--unknown skip" if at_command_line() else "a `skipped` Counter"  # (what eval's --unknown sets)
        raise UsageError(f"{source_names(paths)}: has characters the model never saw ({show_chars(missing)}); "
                         f"evaluate on text like its corpus, or pass {skip} to score the rest")
    if len(missing) <= 16:  # (a scan of the text per character: fast for a few, a minute for thousands)
        skipped.update({c: text.count(c) for c in missing})
    else:
        skipped.update(filter(set(missing).__contains__, text))
    return vocab.ids(text.translate(dict.fromkeys(map(ord, missing))))


def iter_text(files: list[Path], encoding: str = "utf-8", errors: str = "strict",
              chunk_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """(bytes read, text) pieces of the files in order, CHUNK_BYTES at a time.

    An incremental decoder carries a character split between two chunks over to the next
    piece, so chunk boundaries never matter; error offsets count from each file's start.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    for f in files:
        decoder = _decoder(encoding, errors)
        offset = 0
        try:
            with f.open("rb") as fh:
                while raw := fh.read(chunk_bytes):
                    if offset == 0 and (packed := compressed(raw)):
                        raise UsageError(f"{f}: is {packed}-compressed; decompress it first, and give the text")
                    if (nul := raw.find(b"\x00")) >= 0 and _is_utf8(encoding):
                        if offset == 0 and wide_text(f):  # (its byte-order mark says so)
                            raise UsageError(f"{f}: is UTF-16/32 text (it starts with that byte-order mark); "
                                             f"pass {setting('encoding', 'utf-16')} (or utf-32)")
                        raise UsageError(f"{f}: contains NUL bytes (the first at byte {offset + nul:,}), so it is "
                                         f"probably not a text file (use {setting('encoding')} if it is UTF-16/32 "
                                         "text)")
                    yield len(raw), _decode(decoder, raw, f, offset, encoding)
                    offset += len(raw)
        except OSError as e:
            raise UsageError(f"{f}: cannot read ({e.strerror or e})") from None
        yield 0, _decode(decoder, b"", f, offset, encoding, final=True)


MAGIC = {"gzip": re.compile(rb"\x1f\x8b"), "bzip2": re.compile(rb"BZh[1-9]1AY&SY"), "xz": re.compile(rb"\xfd7zXZ\x00"),
         "zstd": re.compile(rb"\x28\xb5\x2f\xfd"), "zip": re.compile(rb"PK\x03\x04")}


def compressed(head: bytes) -> str | None:
    """The compression a file's first bytes announce (a .gz given by name is read, not skipped, and
    its bytes were called 'probably not a text file' with advice about UTF-16)."""
    return next((name for name, magic in MAGIC.items() if magic.match(head)), None)


def _nul_free(encoding: str) -> bool:
    """Whether text in this encoding never holds a NUL byte: all but UTF-16 and UTF-32."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        return True  # (reading says the encoding is unknown)
    return not name.startswith(("utf-16", "utf-32"))


def _is_utf8(encoding: str) -> bool:
    return encoding.lower().replace("-", "").replace("_", "") in ("utf8", "utf8sig")


def _decoder(encoding: str, errors: str) -> io.IncrementalNewlineDecoder:
    """Line ends read as Python's open() reads text, and nanoGPT's prepare.py with it: \\r\\n and a
    lone \\r are \\n. A file saved on Windows would otherwise teach the model a \\r it then samples
    alone (a terminal returns to the line's start and overwrites it), and text with other line ends
    would score as characters the model never saw. UTF-8 also drops a leading byte-order mark
    (Windows editors write one): as a character it would be learnt, sampled mid-text and refused in
    prompts."""
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise UsageError(f"unknown encoding {encoding!r}") from None
    if not getattr(codec, "_is_text_encoding", True):  # rot13, base64, zlib: bytes to bytes, not text
        raise UsageError(f"{encoding!r} is not a text encoding (try utf-8, latin-1, utf-16, cp1252)")
    inner = codecs.getincrementaldecoder("utf-8-sig" if codec.name == "utf-8" else encoding)(errors)
    return io.IncrementalNewlineDecoder(inner, translate=True)


def _decode(decoder: io.IncrementalNewlineDecoder, raw: bytes, f: Path, offset: int, encoding: str,
            final: bool = False) -> str:
    pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous chunk
    try:
        return decoder.decode(raw, final)
    except UnicodeDecodeError as e:
        if offset == pending == 0 and raw.startswith(codecs.BOM_UTF8) and e.encoding.startswith("utf-8"):
            pending = -len(codecs.BOM_UTF8)  # (utf-8-sig counts from after the mark it dropped)
        raise UsageError(f"{f}: not valid {encoding} at byte {offset - pending + e.start}; "
                         f"pass the file's {setting('encoding')}, or {setting('errors', 'replace')} to substitute "
                         "bad bytes") from None
    except UnicodeError as e:  # a codec's complaint about the whole stream (UTF-16 without its BOM)
        raise UsageError(f"{f}: not valid {encoding} ({e}); pass the file's {setting('encoding')}") from None


def _decode_stdin(encoding: str, errors: str) -> str:
    raw = sys.stdin.buffer.read()
    if b"\x00" in raw and _is_utf8(encoding):
        raise UsageError(f"stdin: contains NUL bytes, so it is probably not text (use {setting('encoding')} if it "
                         "is UTF-16/32)")
    return _decode(_decoder(encoding, errors), raw, Path("stdin"), 0, encoding, final=True)


def source_names(paths: list[Path]) -> str:
    """The files read, for messages; `-` is stdin."""
    return "stdin" if [str(p) for p in paths] == ["-"] else _names(paths)


def _names(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


# typographic punctuation, and what a keyboard types for it (best first)
# what --unknown replace tries for a character after its own case: typographic punctuation as typed on a
# keyboard, and the letters Unicode gives no decomposition to strip (ø is not o + a mark, as ö is)
LOOK_ALIKES = {**dict.fromkeys("‘’‚‛′ʼ`´", "'"), **dict.fromkeys("“”„‟″«»", "\"'"),
               **dict.fromkeys("‐‑‒–—―−", "-"), "…": ".", "‹": "'<", "›": "'>",
               **dict(zip("øØłŁđĐħĦıß", "oOlLdDhHis")), "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE"}


def check_unknown(unknown: str) -> None:
    """Refuse an --unknown policy Vocab.fit lacks (the CLI checks before loading a model)."""
    if unknown not in ("error", "skip", "replace"):
        raise UsageError(f"{setting('unknown')} must be error, skip or replace, got {unknown!r}")


def show_char(c: str) -> str:
    """A character as a reader can see it in a message: repr for control and space characters."""
    if c.isprintable() and not c.isspace():
        return c
    return repr(c)[1:-1] if c != " " else "space"


def show_chars(chars, most: int = 10) -> str:
    """The first `most` of `chars` as `show_char` shows them, and how many more there are."""
    chars = list(chars)
    return " ".join(map(show_char, chars[:most])) + (f" and {len(chars) - most} more" if chars[most:] else "")


@dataclass(frozen=True)
class Vocab:
    chars: str  # sorted, distinct

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls.checked("".join(sorted(set(text))))

    @classmethod
    def checked(cls, chars: str) -> Vocab:
        """The vocabulary of these sorted, distinct characters, unless there are too many for text."""
        if len(chars) > MAX_VOCAB:
            raise UsageError(f"{len(chars):,} distinct characters: too many for a character model "
                             f"(limit {MAX_VOCAB:,}); is this a binary file?")
        return cls(chars)

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def _table(self) -> np.ndarray:
        return _codepoints(self.chars)

    @functools.cached_property
    def _lookup(self) -> np.ndarray:
        """Code point -> id, -1 for a character outside the vocabulary."""
        table = self._table
        lookup = np.full(int(table[-1]) + 2 if len(table) else 1, -1, dtype=np.int32)
        lookup[table] = np.arange(len(table))
        return lookup

    def unknown(self, text: str) -> list[str]:
        """Characters of `text` this vocabulary lacks, in order of first appearance."""
        known = set(self.chars)
        return list(dict.fromkeys(c for c in text if c not in known))

    def ids(self, text: str) -> np.ndarray | None:
        """Token ids (uint16/int32) for `text`, or None if it has a character the model never saw."""
        lookup = self._lookup
        ids = lookup[np.minimum(_codepoints(text), len(lookup) - 1)]  # (the last entry is -1)
        if (ids < 0).any():
            return None
        return ids.astype(np.uint16 if len(self) <= 65535 else np.int32)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (uint16/int32) for `text`; raises naming any character the model never saw."""
        ids = self.ids(text)
        if ids is None:
            raise UsageError(self._lacks(self.unknown(text)))
        return ids

    @staticmethod
    def _lacks(missing: list[str]) -> str:
        return f"the model's vocabulary has no {show_chars(missing)}; remove those characters"

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def spelt_as_known(self, text: str) -> str:
        """`text` in whichever Unicode spelling leaves the fewest characters this vocabulary lacks (as
        given, composed or decomposed), then with each still unknown one decomposed where its parts
        are known (a text may need both: É known composed, é only as e and an accent). The
        spellings look the same, so a prompt typed one way fits a corpus that spells it the other.
        Line ends are spelt as the corpus's were read: \r\n and \r as \n, unless the vocabulary has \r
        (a prompt piped from a Windows file was refused for its \r, though its file trained)."""
        text = self._line_ends(text)
        return self._spell(text, self._form(text))

    def _line_ends(self, text: str) -> str:
        if "\r" in text and "\r" not in self.chars:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text

    def _form(self, text: str) -> str:
        return min(("", "NFC", "NFD"), key=lambda form: len(self.unknown(unicodedata.normalize(form, text) if form
                                                                          else text)))

    def _spell(self, text: str, form: str) -> str:
        out = []
        for c in unicodedata.normalize(form, text) if form else text:
            parts = unicodedata.normalize("NFD", c)
            out.append(parts if c not in self.chars and all(p in self.chars for p in parts) else c)
        return "".join(out)

    def fit(self, text: str, unknown: str = "error") -> tuple[str, dict[str, str]]:
        """`text` made encodable, and what changed: each character of `text` as typed (composed) that
        the model never saw, or some part of which it never saw, and what it became ("" where
        dropped). `unknown` is the --unknown policy: error raises naming those characters, skip drops
        what the model never saw, replace maps it to its closest known character. First the text's
        other Unicode spelling is tried (see spelt_as_known), which changes nothing a reader can see."""
        check_unknown(unknown)
        if not isinstance(text, str):  # (None or bytes failed at `"\r" in text`)
            raise UsageError(f"the prompt must be a str, got {type(text).__name__}")
        typed = self._line_ends(text)
        form = self._form(typed)
        text = self._spell(typed, form)
        missing = self.unknown(text)
        if missing and unknown == "error":
            hint = "" if at_command_line() else ' (or pass unknown="skip" or "replace")'  # (the CLI adds its own)
            raise UsageError(self._lacks(list(self._as_typed(typed, form, dict.fromkeys(missing, "")))) + hint)
        changed = {c: "" if unknown == "skip" else self.closest(c) or "" for c in missing}
        return "".join(changed.get(c, c) for c in text), self._as_typed(typed, form, changed)

    def _as_typed(self, typed: str, form: str, changed: dict[str, str]) -> dict[str, str]:
        """`changed` (what each unknown character of the text's spelling became) told of the text as
        typed: of each character with its combining marks, composed, that holds one, what its
        spelling became (Ü spelt U + ¨, the ¨ dropped: U). The error named "¨ ´", marks nobody typed.
        An unknown character no cluster accounts for is named as it is."""
        told, covered = {}, set()
        for cluster in clusters(typed) if changed else ():
            spelt = self._spell(cluster, form)
            if any(c in changed for c in spelt):
                told.setdefault(unicodedata.normalize("NFC", cluster), "".join(changed.get(c, c) for c in spelt))
                covered.update(spelt)
        return {**told, **{c: r for c, r in changed.items() if c not in covered}}

    def closest(self, c: str) -> str | None:
        """The known character most like `c` (case-folded, accent-stripped, typographic punctuation
        as typed on a keyboard: ’ as ', “ as ", – as -; ø as o), or None."""
        base = unicodedata.normalize("NFKD", c)[:1]  # É: E, then e
        alike = LOOK_ALIKES.get(c, "")
        for cand in (c.lower(), c.upper(), *alike, base, base.lower(), base.upper(), *alike.swapcase(),
                     " " if c.isspace() else ""):
            if cand and cand in self.chars:
                return cand
        return None


def clusters(text: str) -> list[str]:
    """`text` as characters with their combining marks (each starts at a character that is not one)."""
    out: list[str] = []
    for c in text:
        if out and unicodedata.combining(c):
            out[-1] += c
        else:
            out.append(c)
    return out


@dataclass(frozen=True)
class Corpus:
    vocab: Vocab
    train: np.ndarray  # token ids (a read-only np.memmap for a cached corpus)
    val: np.ndarray
    digest: str  # sha256 of the training text (UTF-8), checked on --resume
    n_chars: int
    skipped: tuple[Path, ...] = ()  # binary files found under the directories given, and left out
    val_split: bool = False  # the validation text was cut from the training text's end (no --val files)
    uncached: Path | None = None  # the token cache this big corpus could not be written to (encoded in memory)

    def count(self, char: str) -> int:
        """How often `char` occurs in the training and validation text, a slice at a time: a corpus
        of gigabytes compared at once would want a boolean array as large."""
        if char not in self.vocab.chars:
            return 0
        token, step = self.vocab.chars.index(char), 1 << 24
        return sum(int((ids[i:i + step] == token).sum()) for ids in (self.train, self.val)
                   for i in range(0, len(ids), step))

    def val_only(self) -> list[str]:
        """Characters of the validation text that the training text lacks (a --val file in another
        script joined the vocabulary in silence): the model can only learn never to write them. A
        slice at a time, stopping once the training text has shown them all, mostly in its first."""
        size, step = len(self.vocab), 1 << 24
        missing = np.zeros(size, dtype=bool)
        for i in range(0, len(self.val), step):
            missing |= np.bincount(self.val[i:i + step], minlength=size) > 0
        for i in range(0, len(self.train), step):
            if not missing.any():
                break
            missing &= np.bincount(self.train[i:i + step], minlength=size) == 0
        return [self.vocab.chars[j] for j in np.flatnonzero(missing)]


def _paths(given, name: str) -> list[Path]:
    """A notebook's paths: one (load_corpus("input.txt") is one file, not its letters) or a list; a
    load_corpus(5) failed at `'int' object is not iterable`."""
    if isinstance(given, (str, os.PathLike)):
        given = [given]
    try:
        paths = list(given)  # (a glob's generator too)
    except TypeError:
        paths = None
    if paths is None or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise UsageError(f"load_corpus's {name} must be a path or a list of paths, got {given!r}")
    return [Path(p) for p in paths]


def load_corpus(paths: list[Path], val_paths: list[Path] | None = None, val_fraction: float = 0.1,
                encoding: str = "utf-8", errors: str = "strict", vocab: Vocab | None = None,
                store: MemoryStore | TokenCache | None = None) -> Corpus:
    """Read, build the vocabulary (or reuse one, for --resume) and split.

    The default split holds out the *last* `val_fraction` of the text, as nanoGPT does,
    so validation text is never seen in training. With `val_paths` all text trains.
    `store` defaults to memory for small corpora and the token cache for big ones.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"{setting('val_fraction')} must be in [0, 1), got {val_fraction}")
    paths, val_paths = _paths(paths, "paths"), val_paths and _paths(val_paths, "val_paths")
    if not paths:
        raise UsageError("load_corpus needs at least one file or directory to read")
    skipped: list[Path] = []
    nul_free = _nul_free(encoding)
    groups = [(paths, list_files(paths, skipped, nul_free))] + \
        ([(val_paths, list_files(val_paths, skipped, nul_free))] if val_paths else [])
    source = _Source(groups, encoding, errors)
    store = store if store is not None else store_for(source.n_bytes)
    key = source.key(split="val files" if val_paths else f"val fraction {val_fraction!r}")
    with store.lock():
        encoded = store.get(key)
        if encoded is None:
            vocab_found, counts = source.scan()
            cut = counts[0] if val_paths else counts[0] - int(counts[0] * val_fraction)
            encoded = store.put(key, vocab_found.chars, cut, sum(counts),
                                lambda sink: source.encode(vocab_found, cut, sink))
    if vocab is not None and vocab.chars != encoded.vocab:
        encoded = _with_vocab(encoded, vocab, store, key)
    ids = encoded.ids
    return Corpus(Vocab(encoded.vocab), ids[:encoded.cut], ids[encoded.cut:], encoded.digest, len(ids),
                  tuple(skipped), val_split=not val_paths, uncached=getattr(store, "unwritable", None))


@dataclass(frozen=True)
class _Source:
    """A corpus's files and how to read them: the training files, then any --val files."""
    groups: list[tuple[list[Path], list[Path]]]  # (paths as the user named them, the files they hold)
    encoding: str
    errors: str

    @functools.cached_property
    def n_bytes(self) -> int:
        return sum(f.stat().st_size for _, files in self.groups for f in files)

    def key(self, split: str) -> str:
        """sha256 of all the ids depend on: every file's bytes, in order and by group, and how they are read."""
        h = hashlib.sha256(f"tfcli tokens {FORMAT}\0{self.encoding}\0{self.errors}\0{split}".encode())
        buf = bytearray(CHUNK_BYTES)
        with _bar(self.n_bytes, "hashing") as bar:
            for i, (_, files) in enumerate(self.groups):
                for f in files:
                    try:
                        with f.open("rb") as fh:
                            h.update(f"\0{i}\0{f.stat().st_size}\0".encode())
                            while n := fh.readinto(buf):
                                h.update(memoryview(buf)[:n])
                                bar.update(n)
                    except OSError as e:
                        raise UsageError(f"{f}: cannot read ({e.strerror or e})") from None
        return h.hexdigest()

    def scan(self) -> tuple[Vocab, list[int]]:
        """First pass: the vocabulary, and each group's length in characters (refusing an empty one)."""
        seen = np.zeros(0x110000, dtype=bool)  # one flag per Unicode code point
        counts = []
        with _bar(self.n_bytes, "reading") as bar:
            for names, files in self.groups:
                n = 0
                for n_bytes, text in iter_text(files, self.encoding, self.errors):
                    seen[np.flatnonzero(np.bincount(_codepoints(text)))] = True
                    n += len(text)
                    bar.update(n_bytes)
                if n == 0:
                    raise UsageError(f"{_names(names)}: empty corpus, no text to read")
                counts.append(n)
        return Vocab.checked("".join(map(chr, np.flatnonzero(seen)))), counts

    def encode(self, vocab: Vocab, cut: int, sink: Sink) -> str:
        """Second pass: every character's id, in order, to `sink`; returns the digest of the first `cut`."""
        table = _codepoints(vocab.chars)
        lookup = np.zeros(int(table[-1]) + 1, dtype=ids_dtype(len(vocab)))  # code point -> id
        lookup[table] = np.arange(len(vocab))
        h = hashlib.sha256()
        pos = 0
        with _bar(self.n_bytes, "encoding") as bar:
            for _, files in self.groups:
                for n_bytes, text in iter_text(files, self.encoding, self.errors):
                    sink(np.take(lookup, _codepoints(text)))
                    if pos < cut:
                        h.update(text[:cut - pos].encode("utf-8", "surrogatepass"))
                    pos += len(text)
                    bar.update(n_bytes)
        return h.hexdigest()


def _bar(total: int, desc: str) -> tqdm:
    """A progress bar on stderr, only on a terminal and only for work that lasts over a second."""
    tqdm.monitor_interval = 0  # (no monitor thread left running: a notebook's thread list stays its own)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False, delay=1.0,
                disable=None)


def _with_vocab(encoded: Encoded, vocab: Vocab, store: MemoryStore | TokenCache, key: str) -> Encoded:
    """The same text's ids under a given vocabulary (a resumed run's), which must hold all its characters."""
    missing = [c for c in encoded.vocab if c not in set(vocab.chars)]
    if missing:
        raise UsageError(f"the corpus has characters the run's vocabulary lacks ({show_chars(missing)}); "
                         "it is not the corpus this run trained on")
    table = np.searchsorted(_codepoints(vocab.chars), _codepoints(encoded.vocab)).astype(ids_dtype(len(vocab)))

    def fill(sink: Sink) -> str:
        for start in range(0, len(encoded.ids), CHUNK_BYTES):
            sink(table[encoded.ids[start:start + CHUNK_BYTES]])
        return encoded.digest

    key = hashlib.sha256(f"{key}\0{vocab.chars}".encode("utf-8", "surrogatepass")).hexdigest()
    with store.lock():
        found = store.get(key)
        return found if found is not None else store.put(key, vocab.chars, encoded.cut, len(encoded.ids), fill)
