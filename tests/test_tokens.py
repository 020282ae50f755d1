"""The token cache: big corpora encoded once, memory-mapped, found again by content."""

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from tfcli import corpus as corpus_module
from tfcli.corpus import Vocab, load_corpus
from tfcli.errors import TfcliError, UsageError
from tfcli.tokens import CACHE_MIN_BYTES, MemoryStore, TokenCache, ids_dtype, release, store_for

TEXT = "Grüße, ÅNGSTRÖM! 你好 🙂 naïve café\n" * 40


def write(tmp_path: Path, text: str, name: str = "t.txt") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def entries(cache: TokenCache) -> list[str]:
    return sorted(p.name for p in cache.root.iterdir() if p.name != "lock")


@pytest.fixture
def cache(tmp_path) -> TokenCache:
    return TokenCache(tmp_path / "cache")


def test_cached_corpus_is_memory_mapped_and_equals_the_in_memory_one(tmp_path, cache):
    f = write(tmp_path, TEXT)
    held = load_corpus([f], store=MemoryStore())
    mapped = load_corpus([f], store=cache)
    assert isinstance(mapped.train, np.memmap) and isinstance(mapped.val, np.memmap)
    assert (mapped.vocab, mapped.digest, mapped.n_chars) == (held.vocab, held.digest, held.n_chars)
    assert np.array_equal(mapped.train, held.train) and np.array_equal(mapped.val, held.val)
    assert mapped.vocab.decode(mapped.train) + mapped.vocab.decode(mapped.val) == TEXT


def test_second_load_reuses_the_cache_without_decoding(tmp_path, cache, monkeypatch):
    f = write(tmp_path, TEXT)
    first = load_corpus([f], store=cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the text was decoded again")

    monkeypatch.setattr(corpus_module, "iter_text", no_decoding)
    second = load_corpus([f], store=cache)
    assert np.array_equal(second.train, first.train) and second.digest == first.digest
    assert len(entries(cache)) == 2  # one .tokens, one .json


def test_changed_text_is_encoded_again(tmp_path, cache):
    f = write(tmp_path, TEXT)
    before = load_corpus([f], store=cache)
    write(tmp_path, TEXT.replace("café", "cafe"))
    after = load_corpus([f], store=cache)
    assert after.digest != before.digest
    assert after.vocab.decode(after.train) + after.vocab.decode(after.val) == TEXT.replace("café", "cafe")


def test_a_changed_split_keeps_the_training_text_digest_right(tmp_path, cache):
    f = write(tmp_path, TEXT)
    for fraction in (0.1, 0.25, 0.1):
        corpus = load_corpus([f], val_fraction=fraction, store=cache)
        cut = len(TEXT) - int(len(TEXT) * fraction)
        assert corpus.digest == hashlib.sha256(TEXT[:cut].encode()).hexdigest()  # as before the cache existed
        assert len(corpus.train) == cut


@pytest.mark.parametrize("n_chars, dtype", [(256, np.uint8), (257, np.uint16)])
def test_ids_take_one_byte_up_to_256_characters_and_two_beyond(tmp_path, cache, n_chars, dtype):
    text = "".join(chr(0x100 + i) for i in range(n_chars)) * 3
    corpus = load_corpus([write(tmp_path, text)], store=cache)
    assert corpus.train.dtype == dtype and len(corpus.vocab) == n_chars
    (ids_file,) = cache.root.glob("*.tokens")
    assert ids_file.stat().st_size == len(text) * np.dtype(dtype).itemsize
    assert corpus.vocab.decode(corpus.train) + corpus.vocab.decode(corpus.val) == text


def test_largest_vocabulary_fits_two_bytes():
    assert ids_dtype(20_000) == np.uint16


def test_directories_files_and_val_files_make_one_entry(tmp_path, cache):
    write(tmp_path, "bbb\n", "books/b.txt")
    write(tmp_path, "aaa\n", "books/a.txt")
    extra = write(tmp_path, "extra\n", "extra.txt")
    val = write(tmp_path, "ab x\n", "val.txt")
    corpus = load_corpus([tmp_path / "books", extra], val_paths=[val], store=cache)
    assert corpus.vocab.decode(corpus.train) == "aaa\nbbb\nextra\n"
    assert corpus.vocab.decode(corpus.val) == "ab x\n"
    assert len(entries(cache)) == 2


def test_interrupted_encoding_leaves_no_entry(tmp_path, cache, monkeypatch):
    f = write(tmp_path, TEXT)

    def interrupted(self, vocab, cut, sink):
        sink(np.zeros(10, dtype=ids_dtype(len(vocab))))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(corpus_module._Source, "encode", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_corpus([f], store=cache)
    assert entries(cache) == []
    corpus = load_corpus([f], store=cache)
    assert corpus.vocab.decode(corpus.train) + corpus.vocab.decode(corpus.val) == TEXT


@pytest.mark.parametrize("damage", [lambda b: b[:-5], lambda b: b[:7] + b"\xff" + b[8:]],
                         ids=["truncated", "an-id-past-the-vocabulary"])
def test_a_damaged_entry_is_encoded_again(tmp_path, cache, damage):
    f = write(tmp_path, TEXT)
    good = load_corpus([f], store=cache)
    train, val = np.array(good.train), np.array(good.val)  # copies: the damage below rewrites the mapped file
    (ids_file,) = cache.root.glob("*.tokens")
    ids_file.write_bytes(damage(ids_file.read_bytes()))
    again = load_corpus([f], store=cache)
    assert np.array_equal(again.train, train) and np.array_equal(again.val, val)


def test_resumed_runs_vocabulary_remaps_the_cached_ids(tmp_path, cache):
    f = write(tmp_path, "cab" * 10)
    corpus = load_corpus([f], val_fraction=0.0, vocab=Vocab("abcd"), store=cache)
    assert corpus.train.tolist()[:3] == [2, 0, 1] and corpus.vocab == Vocab("abcd")
    assert isinstance(corpus.train, np.memmap)
    assert load_corpus([f], val_fraction=0.0, vocab=Vocab("abcd"), store=cache).train.tolist() == corpus.train.tolist()
    assert len(entries(cache)) == 4  # the corpus's own ids, and the remapped ones


def test_resumed_vocabulary_lacking_a_character_is_refused(tmp_path, cache):
    with pytest.raises(TfcliError, match=r"lacks \(z\)"):
        load_corpus([write(tmp_path, "abcz")], vocab=Vocab("abc"), store=cache)


@pytest.mark.parametrize("data, message", [
    (b"abc\x00def", "NUL bytes"), (b"abc\xffdef", "not valid utf-8 at byte 3"), (b"", "empty corpus")])
def test_bad_input_is_refused_and_never_cached(tmp_path, cache, data, message):
    (tmp_path / "x.txt").write_bytes(data)
    with pytest.raises(UsageError, match=message):
        load_corpus([tmp_path / "x.txt"], store=cache)
    assert entries(cache) == []


def test_unwritable_cache_is_one_clear_error(tmp_path):
    blocker = write(tmp_path, "not a directory", "file")
    with pytest.raises(TfcliError, match="cannot write the token cache.*TFCLI_CACHE"):
        load_corpus([write(tmp_path, TEXT)], store=TokenCache(blocker / "cache"))


def test_a_big_corpus_whose_cache_cannot_be_written_is_encoded_in_memory_and_says_so(monkeypatch, tmp_path):
    blocker = write(tmp_path, "not a directory", "file")
    monkeypatch.setenv("TFCLI_CACHE", str(blocker / "cache"))  # (a read-only home: it refused the run)
    monkeypatch.setattr("tfcli.tokens.CACHE_MIN_BYTES", 10)
    corpus = load_corpus([write(tmp_path, TEXT)])
    assert corpus.uncached == blocker / "cache" and len(corpus.train) + len(corpus.val) == len(TEXT)
    monkeypatch.setenv("TFCLI_CACHE", str(tmp_path / "fine"))
    assert load_corpus([write(tmp_path, TEXT)]).uncached is None and (tmp_path / "fine").is_dir()


def test_only_big_corpora_go_to_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TFCLI_CACHE", str(tmp_path))
    assert isinstance(store_for(CACHE_MIN_BYTES - 1), MemoryStore)
    assert isinstance(store_for(CACHE_MIN_BYTES), TokenCache) and store_for(CACHE_MIN_BYTES).root == tmp_path


def resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of `path` (Linux)."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0]:
            current = parts[-1] if len(parts) > 5 else ""
        elif parts[0] == "Rss:" and current == str(path):
            total += int(parts[1])
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/smaps")
def test_released_map_drops_its_pages_and_keeps_its_data(tmp_path, cache):
    corpus = load_corpus([write(tmp_path, TEXT * 200)], store=cache)
    (ids_file,) = cache.root.glob("*.tokens")
    before = np.array(corpus.train)  # touches every page
    assert resident_kb(ids_file.resolve()) > 0
    release(corpus.train)
    assert resident_kb(ids_file.resolve()) == 0
    assert np.array_equal(corpus.train, before) and np.array_equal(corpus.val[:5], np.array(corpus.val[:5]))


def test_releasing_an_in_memory_array_changes_nothing():
    ids = np.arange(10, dtype=np.uint8)
    release(ids[2:])
    assert ids.tolist() == list(range(10))
