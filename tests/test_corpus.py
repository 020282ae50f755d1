import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from tfcli import corpus as corpus_module
from tfcli.corpus import MAX_VOCAB, Vocab, iter_text, load_corpus, read_text
from tfcli.errors import USAGE, TfcliError, UsageError, command_line

MIXED = "Grüße, ÅNGSTRÖM! 你好，世界。 🙂🚀 naïve café\tend\n"


def test_vocab_round_trips_non_ascii_text():
    vocab = Vocab.from_text(MIXED)
    ids = vocab.encode(MIXED)
    assert vocab.decode(ids) == MIXED
    assert len(ids) == len(MIXED)  # one id per code point, not per byte


def test_vocab_is_the_sorted_set_of_code_points():
    vocab = Vocab.from_text(MIXED)
    assert vocab.chars == "".join(sorted(set(MIXED)))
    assert [ord(c) for c in vocab.chars] == sorted(ord(c) for c in set(MIXED))
    assert vocab.encode("🚀").tolist() == [vocab.chars.index("🚀")]
    assert vocab.encode(vocab.chars).tolist() == list(range(len(vocab)))


def test_ids_are_compact_integers():
    assert Vocab.from_text("abc").encode("cab").dtype == np.uint16


def test_unknown_characters_are_named_once_each_in_order():
    vocab = Vocab.from_text("abc")
    with pytest.raises(UsageError) as e:
        vocab.encode("abzyz 🙂\t")
    assert "no z y space 🙂 \\t;" in e.value.message
    assert e.value.exit_code == USAGE


def test_many_unknown_characters_are_summarised():
    vocab = Vocab.from_text("a")
    with pytest.raises(UsageError, match="no b c d e f g h i j k and 15 more;"):
        vocab.encode("bcdefghijklmnopqrstuvwxyz")


def test_unknown_lists_missing_characters():
    assert Vocab.from_text("abc").unknown("xaxyb") == ["x", "y"]


@pytest.mark.parametrize("char, closest", [("A", "a"), ("é", "e"), ("É", "e"), ("À", "a"), ("\t", " "), ("B", "b"),
                                           ("z", None)])
def test_closest_known_character(char, closest):
    assert Vocab.from_text("a be").closest(char) == closest


def test_typographic_punctuation_is_replaced_by_what_a_keyboard_types():
    vocab = Vocab.from_text("it's a \"b\" - c.")
    assert vocab.fit("it’s “b” – c…", "replace") == ("it's \"b\" - c.", {"’": "'", "“": '"', "”": '"', "–": "-",
                                                                        "…": "."})
    assert Vocab.from_text("it's").closest("“") == "'"  # (no " known: the nearest quote)
    assert Vocab.from_text("it's a").closest("´") == "'"  # (not its compatibility form, a space and an accent)


def test_fit_applies_the_unknown_policy_and_says_what_it_changed():
    vocab = Vocab.from_text("a be")
    assert vocab.fit("Abe€ a", "replace") == ("abe a", {"A": "a", "€": ""})  # (€ has no close character)
    assert vocab.fit("Abe€ a", "skip") == ("be a", {"A": "", "€": ""})
    assert vocab.fit("abe", "error") == ("abe", {})
    way_out = r' \(or pass unknown="skip" or "replace"\)$'
    with pytest.raises(UsageError, match="has no A €; remove those characters" + way_out):
        vocab.fit("Abe€", "error")
    with command_line(), pytest.raises(UsageError, match="has no A €; remove those characters$"):  # (the CLI says how)
        vocab.fit("Abe€", "error")
    with pytest.raises(UsageError, match="^unknown must be error, skip or replace"):
        vocab.fit("abe", "guess")
    with command_line(), pytest.raises(UsageError, match="^--unknown must be error, skip or replace"):
        vocab.fit("abe", "guess")


def test_fit_first_reads_a_text_in_the_spelling_the_vocabulary_knows():
    decomposed, composed = Vocab.from_text("cafe\u0301 "), Vocab.from_text("café ")
    assert decomposed.fit("café") == ("cafe\u0301", {})
    assert composed.fit("cafe\u0301") == ("café", {})
    assert Vocab.from_text("cafe\u0301 É").fit("É café") == ("É cafe\u0301", {})  # (no one spelling has all)
    assert decomposed.fit("café €", "skip") == ("cafe\u0301 ", {"€": ""})  # (only € is unknown)


def test_what_fit_changed_is_told_of_the_characters_as_typed_not_of_their_accents():
    """A vocabulary without Ü, ï or é spelt them U + ¨ ...: the error named "¨ ø ´", marks nobody typed."""
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :")
    with pytest.raises(UsageError, match="has no Ü ï ø é 日 本; remove"):
        vocab.fit("Ünïcødé 日本 ROMEO")
    text, changed = vocab.fit("Ünïcødé 日本 ROMEO", "replace")
    assert text == "Unicode  ROMEO"
    assert changed == {"Ü": "U", "ï": "i", "ø": "o", "é": "e", "日": "", "本": ""}  # (ø has no accent to strip)
    assert vocab.fit("Ünïcødé", "skip") == ("Unicde", {"Ü": "U", "ï": "i", "ø": "", "é": "e"})  # (their marks)
    assert vocab.fit("Łódź straße", "replace") == ("Lodz strase", {"Ł": "L", "ó": "o", "ź": "z", "ß": "s"})


def test_a_known_character_is_not_reported_for_an_unknown_mark_elsewhere_nor_an_unknown_one_left_out():
    composed = Vocab.from_text("abcdeé xyz")  # (é known composed; no bare acute accent)
    with pytest.raises(UsageError, match="has no á; remove"):  # (not "é á": é is known, and left as typed)
        composed.fit("éa\u0301")
    assert composed.fit("café ca\u0301", "replace") == ("caé ca", {"f": "", "á": "a"})  # (what each became)
    signs = Vocab.from_text("Uabc K")
    assert signs.fit("\u2126 U\u0308", "skip") == (" U", {"Ω": "", "Ü": "U"})  # (the ohm sign composes to Ω)
    with pytest.raises(UsageError, match="has no Ω Ü; remove"):
        signs.fit("\u2126U\u0308")


def test_a_text_is_spelt_as_the_vocabulary_spells_it():
    decomposed = Vocab.from_text("cafe\u0301 ")  # (e and a combining acute accent)
    assert decomposed.spelt_as_known("café") == "cafe\u0301"
    assert Vocab.from_text("café").spelt_as_known("cafe\u0301") == "café"
    assert Vocab.from_text("cafe\u0301 É").spelt_as_known("É café") == "É cafe\u0301"  # (each spelling lacks one)


def test_a_prompts_line_ends_are_spelt_as_the_corpus_was_read_unless_the_vocabulary_has_cr():
    assert Vocab.from_text("a\nb").spelt_as_known("a\r\nb\ra") == "a\nb\na"  # (stdin is not translated)
    assert Vocab.from_text("a\r\nb").spelt_as_known("a\r\nb") == "a\r\nb"  # (a model from before FORMAT 3)
    assert Vocab.from_text("cafe").spelt_as_known("café") == "café"  # (no accent to spell it with: left unknown)


def test_too_many_distinct_characters_is_refused():
    text = "".join(chr(0x4E00 + i) for i in range(MAX_VOCAB + 1))
    with pytest.raises(UsageError, match="too many"):
        Vocab.from_text(text)


def test_split_holds_out_the_last_fraction(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    (tmp_path / "t.txt").write_text(text)
    corpus = load_corpus([tmp_path / "t.txt"], val_fraction=0.1)
    assert corpus.vocab.decode(corpus.train) == text[:90]
    assert corpus.vocab.decode(corpus.val) == text[90:]
    assert corpus.n_chars == 100


def test_count_finds_a_character_in_both_splits(tmp_path):
    (tmp_path / "t.txt").write_text("a\ufffdb" * 30 + "\ufffd" * 7)
    corpus = load_corpus([tmp_path / "t.txt"], val_fraction=0.1)
    assert corpus.count("\ufffd") == 37 and corpus.count("a") == 30 and corpus.count("z") == 0
    assert int((corpus.val == corpus.vocab.chars.index("\ufffd")).sum()) > 0  # (some in each split)


def test_zero_val_fraction_trains_on_everything(tmp_path):
    (tmp_path / "t.txt").write_text("abcdef")
    corpus = load_corpus([tmp_path / "t.txt"], val_fraction=0.0)
    assert corpus.vocab.decode(corpus.train) == "abcdef"
    assert len(corpus.val) == 0


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_val_fraction_outside_range_is_refused(tmp_path, fraction):
    (tmp_path / "t.txt").write_text("abcdef")
    with pytest.raises(UsageError, match="^val_fraction must be in"):
        load_corpus([tmp_path / "t.txt"], val_fraction=fraction)


def test_val_files_leave_all_text_for_training(tmp_path):
    (tmp_path / "t.txt").write_text("abcabc")
    (tmp_path / "v.txt").write_text("cabx")
    corpus = load_corpus([tmp_path / "t.txt"], val_paths=[tmp_path / "v.txt"])
    assert corpus.vocab.decode(corpus.train) == "abcabc"
    assert corpus.vocab.decode(corpus.val) == "cabx"
    assert corpus.vocab.chars == "abcx"


def test_utf8_byte_order_marks_are_not_text(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffabc".encode())
    (tmp_path / "b.txt").write_bytes("\ufeffdef\ufeff".encode())  # (one that is not at the start is text)
    assert read_text([tmp_path / "a.txt", tmp_path / "b.txt"]) == "abcdef\ufeff"


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])  # (a \r\n split between two reads is one line end)
def test_line_ends_read_as_newlines_as_python_reads_text(tmp_path, chunk):
    (tmp_path / "x.txt").write_bytes("ab\r\ncd\r\r\né\rf\r".encode())
    text = "".join(t for _, t in iter_text([tmp_path / "x.txt"], chunk_bytes=chunk))
    assert text == "ab\ncd\n\né\nf\n" == (tmp_path / "x.txt").read_text()
    (tmp_path / "u16.txt").write_bytes("a\r\nb".encode("utf-16"))
    assert read_text([tmp_path / "u16.txt"], encoding="utf-16") == "a\nb"


def test_a_text_with_windows_line_ends_trains_without_a_carriage_return(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"one\r\ntwo\r\nthree\r\n" * 20)
    corpus = load_corpus([tmp_path / "t.txt"])
    assert "\r" not in corpus.vocab.chars and "\n" in corpus.vocab.chars


def test_utf16_without_its_byte_order_mark_is_a_usage_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"plain bytes")
    with pytest.raises(UsageError, match="not valid utf-16"):
        read_text([tmp_path / "a.txt"], encoding="utf-16")


def test_directory_is_read_as_its_text_files_sorted(tmp_path):
    d = tmp_path / "books"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("B")
    (d / "a.txt").write_text("A")
    (d / "sub" / "c.md").write_text("C")
    (d / ".hidden.txt").write_text("H")
    (d / "model.safetensors").write_bytes(b"\x00\x01")
    assert read_text([d]) == "ABC"


def test_directory_skips_the_training_logs_tfcli_writes_into_run_directories(tmp_path):
    from tfcli.checkpoint import METRICS_FILE
    d = tmp_path / "notes"
    (d / "runs" / "notes").mkdir(parents=True)
    (d / "a.txt").write_text("A")
    for name in (METRICS_FILE, METRICS_FILE + ".prev", METRICS_FILE + ".prev2"):  # what `tfcli train notes` writes
        (d / "runs" / "notes" / name).write_text('{"step": 1}\n')
    (d / "runs" / "notes" / "model.safetensors").write_bytes(b"\x00")
    (d / "logs").mkdir()
    (d / "logs" / "metrics.txt").write_text("M")  # a text of a similar name is text like any
    assert read_text([d]) == "AM"


def test_binary_files_in_a_directory_are_left_out_and_listed(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_text("hello world\n" * 50)
    (d / "tool").write_bytes(b"\x7fELF\x02\x01\x00\x00" + bytes(range(256)))  # a program: no telling suffix
    for encoding in ("utf-8", "latin-1"):  # (any encoding but UTF-16/32 means a NUL is not text)
        corpus = load_corpus([d], encoding=encoding)
        assert corpus.skipped == (d / "tool",)
        assert corpus.vocab.chars == "".join(sorted(set("hello world\n")))
    with pytest.raises(UsageError, match="NUL bytes"):  # named outright, it is refused, not skipped
        load_corpus([d / "tool"])


def test_utf16_files_in_a_directory_are_text_when_the_encoding_says_so(tmp_path):
    d = tmp_path / "wide"
    d.mkdir()
    (d / "a.txt").write_bytes("hello world\n".encode("utf-16"))
    assert read_text([d], encoding="utf-16") == "hello world\n"


def test_stdin_as_a_training_corpus_is_refused_with_a_way_out():
    # (training reads its text twice, and resuming needs it again; `eval -` reads stdin: read_text)
    with pytest.raises(UsageError, match="cannot come from stdin"):
        load_corpus([Path("-")])


def test_read_text_takes_stdin_alone(monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffhello\n".encode())))
    assert read_text([Path("-")]) == "hello\n"  # (a byte-order mark is not text, as in files)
    with pytest.raises(UsageError, match="once and alone"):
        read_text([Path("-"), Path("x.txt")])


def test_directory_without_text_files_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no text files"):
        read_text([tmp_path / "empty"])


def test_several_files_are_joined_in_order(tmp_path):
    (tmp_path / "1.txt").write_text("one ")
    (tmp_path / "2.txt").write_text("two")
    assert read_text([tmp_path / "2.txt", tmp_path / "1.txt"]) == "twoone "


def test_nul_bytes_mean_not_text(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc\x00def")
    with pytest.raises(UsageError, match="NUL bytes \\(the first at byte 3\\).*use encoding if"):
        read_text([tmp_path / "x.bin"])
    with command_line(), pytest.raises(UsageError, match="use --encoding if"):
        read_text([tmp_path / "x.bin"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_file_with_a_utf_16_or_32_byte_order_mark_is_named_as_such(tmp_path, encoding):
    (tmp_path / "wide.txt").write_text("hello\n", encoding=encoding)  # (with its byte-order mark)
    with pytest.raises(UsageError, match="wide.txt: is UTF-16/32 text .*pass encoding='utf-16' \\(or utf-32\\)"):
        read_text([tmp_path / "wide.txt"])  # (it was "probably not a text file")
    with command_line(), pytest.raises(UsageError, match="pass --encoding utf-16 \\(or utf-32\\)"):
        read_text([tmp_path / "wide.txt"])
    assert read_text([tmp_path / "wide.txt"], encoding=encoding) == "hello\n"


def test_a_compressed_file_is_named_as_such(tmp_path):
    import bz2
    import gzip
    import lzma
    text = ("hello world\n" * 100).encode()
    for name, pack in (("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)):
        (tmp_path / "t.packed").write_bytes(pack(text))
        with pytest.raises(UsageError, match=f"is {name}-compressed; decompress it first"):
            read_text([tmp_path / "t.packed"])
    (tmp_path / "t.txt").write_bytes(b"BZh is a word here, and PK\x03 too\n")  # text that merely starts so
    assert read_text([tmp_path / "t.txt"]).startswith("BZh is")


def test_utf16_text_reads_with_its_encoding(tmp_path):
    (tmp_path / "x.txt").write_bytes("héllo".encode("utf-16"))
    assert read_text([tmp_path / "x.txt"], encoding="utf-16") == "héllo"


def test_invalid_utf8_names_the_byte_and_the_fix(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(UsageError) as e:
        read_text([tmp_path / "x.txt"])
    assert "x.txt: not valid utf-8 at byte 3" in e.value.message
    assert "pass the file's encoding, or errors='replace'" in e.value.message
    with command_line(), pytest.raises(UsageError, match="pass the file's --encoding, or --errors replace"):
        read_text([tmp_path / "x.txt"])


def test_errors_replace_substitutes_bad_bytes(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"abc\xffdef")
    assert read_text([tmp_path / "x.txt"], errors="replace") == "abc\ufffddef"


def test_unknown_encoding_is_a_usage_error(tmp_path):
    (tmp_path / "x.txt").write_text("abc")
    with pytest.raises(UsageError, match="unknown encoding 'klingon'"):
        read_text([tmp_path / "x.txt"], encoding="klingon")
    for codec in ("rot13", "base64"):  # (codecs, but of bytes to bytes: a TypeError deep in decoding)
        with pytest.raises(UsageError, match=f"'{codec}' is not a text encoding"):
            read_text([tmp_path / "x.txt"], encoding=codec)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UsageError, match="empty corpus"):
        read_text([tmp_path / "x.txt"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="nope.txt: no such file or directory"):
        load_corpus([tmp_path / "nope.txt"])


def test_reused_vocab_refuses_a_corpus_with_new_characters(tmp_path):
    (tmp_path / "t.txt").write_text("abcz")
    with pytest.raises(TfcliError, match=r"lacks \(z\)"):
        load_corpus([tmp_path / "t.txt"], vocab=Vocab("abc"))


def test_reused_vocab_keeps_its_ids(tmp_path):
    (tmp_path / "t.txt").write_text("cab")
    corpus = load_corpus([tmp_path / "t.txt"], val_fraction=0.0, vocab=Vocab("abcd"))
    assert corpus.train.tolist() == [2, 0, 1]
    assert len(corpus.vocab) == 4


def test_digest_changes_with_the_training_text(tmp_path):
    (tmp_path / "a.txt").write_text("abcabc")
    (tmp_path / "b.txt").write_text("abcabd")
    a1 = load_corpus([tmp_path / "a.txt"], val_fraction=0.0)
    a2 = load_corpus([tmp_path / "a.txt"], val_fraction=0.0)
    b = load_corpus([tmp_path / "b.txt"], val_fraction=0.0)
    assert a1.digest == a2.digest != b.digest


def test_real_corpus_loads_with_its_known_vocabulary(shakespeare):
    corpus = load_corpus([shakespeare])
    assert len(corpus.vocab) == 65
    assert len(corpus.train) + len(corpus.val) == corpus.n_chars


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_characters_split_between_chunks_are_decoded_whole(tmp_path, chunk):
    (tmp_path / "x.txt").write_text(MIXED, encoding="utf-8")
    pieces = list(iter_text([tmp_path / "x.txt"], chunk_bytes=chunk))
    assert "".join(text for _, text in pieces) == MIXED
    assert max(n for n, _ in pieces) <= chunk  # the file is streamed, never read whole
    assert sum(n for n, _ in pieces) == len(MIXED.encode())


@pytest.mark.parametrize("data, offset", [
    ("héllo wörld ".encode() * 3 + b"\xff tail", 42),  # a bad byte in a later chunk
    (b"ab\xe4A more", 2),  # a sequence begun in one chunk and broken in the next
    (b"abc" + "é".encode()[:1], 3),  # a file that ends inside a character
    (b"\xef\xbb\xbfabcdef\xff", 9),  # after a byte-order mark, which is a file's bytes too
])
@pytest.mark.parametrize("chunk", [1, 3, 7, None])
def test_invalid_utf8_is_named_by_its_offset_in_the_file_whatever_the_chunks(tmp_path, data, offset, chunk):
    (tmp_path / "x.txt").write_bytes(data)
    with pytest.raises(UsageError, match=f"x.txt: not valid utf-8 at byte {offset};"):
        list(iter_text([tmp_path / "x.txt"], chunk_bytes=chunk))


def test_nul_bytes_after_the_first_chunk_mean_not_text(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc" * 10 + b"\x00")
    with pytest.raises(UsageError, match="NUL bytes"):
        list(iter_text([tmp_path / "x.bin"], chunk_bytes=4))


def test_errors_replace_works_across_chunks(tmp_path):
    (tmp_path / "x.txt").write_bytes("añb".encode()[:2] + b"\xff" + "ñ".encode())
    assert "".join(t for _, t in iter_text([tmp_path / "x.txt"], errors="replace", chunk_bytes=1)) == "a\ufffd\ufffdñ"


def test_small_chunks_give_the_same_corpus_and_digest(tmp_path, monkeypatch):
    text = MIXED * 7
    (tmp_path / "a.txt").write_text(text[:100])
    (tmp_path / "b.txt").write_text(text[100:])
    whole = load_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], val_fraction=0.3)
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 5)
    chunked = load_corpus([tmp_path / "a.txt", tmp_path / "b.txt"], val_fraction=0.3)
    cut = len(text) - int(len(text) * 0.3)
    assert chunked.vocab.decode(chunked.train) == text[:cut] and chunked.vocab.decode(chunked.val) == text[cut:]
    assert np.array_equal(chunked.train, whole.train) and np.array_equal(chunked.val, whole.val)
    assert chunked.digest == whole.digest == hashlib.sha256(text[:cut].encode()).hexdigest()


def test_empty_val_file_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abc")
    (tmp_path / "v.txt").write_text("")
    with pytest.raises(UsageError, match="v.txt: empty corpus"):
        load_corpus([tmp_path / "t.txt"], val_paths=[tmp_path / "v.txt"])


def test_encode_text_reads_a_chunk_at_a_time_into_the_ids_of_the_whole_text(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "CHUNK_BYTES", 5)
    (tmp_path / "a.txt").write_text("héllo wörld\r\n" * 3, newline="")
    (tmp_path / "b.txt").write_text("dlrow")
    vocab = Vocab.from_text("hélo wördl\n")
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    ids = corpus_module.encode_text(paths, vocab)
    assert ids.dtype == np.uint16 and vocab.decode(ids) == "héllo wörld\n" * 3 + "dlrow"
    (tmp_path / "c.txt").write_text("hélo\twörld")
    with pytest.raises(UsageError, match=r"^\S*/c.txt: has characters the model never saw \(\\t\).*`skipped` Counter"):
        corpus_module.encode_text([tmp_path / "a.txt", tmp_path / "c.txt"], vocab)  # (the file that has it)
    with command_line(), pytest.raises(UsageError, match="or pass --unknown skip to score the rest"):
        corpus_module.encode_text([tmp_path / "c.txt"], vocab)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(UsageError, match="empty"):
        corpus_module.encode_text([tmp_path / "e.txt"], vocab)


def test_vocab_ids_are_none_for_a_character_beyond_or_between_its_own():
    vocab = Vocab.from_text("bd")
    assert vocab.ids("dbd").tolist() == [1, 0, 1]
    assert vocab.ids("bc") is None and vocab.ids("e") is None and vocab.ids("a") is None
    assert Vocab.from_text("").ids("a") is None


def test_load_corpus_takes_a_path_as_a_string_too(tmp_path):
    (tmp_path / "t.txt").write_text("abcabc" * 10)
    assert load_corpus(tmp_path.glob("*.txt")).n_chars == 60  # (a glob's generator, as a notebook writes it)
    assert load_corpus(str(tmp_path / "t.txt")).vocab.chars == load_corpus([tmp_path / "t.txt"]).vocab.chars == "abc"
    assert load_corpus([str(tmp_path / "t.txt")], val_paths=[str(tmp_path / "t.txt")]).n_chars == 120


@pytest.mark.parametrize("paths, message", [
    (5, "load_corpus's paths must be a path or a list of paths, got 5"),  # (`'int' object is not iterable`)
    ([Path("a.txt"), 3], "must be a path or a list of paths"),
    ([], "load_corpus needs at least one file or directory"),  # (": empty corpus", with no name before it)
])
def test_load_corpus_says_what_it_takes(paths, message):
    with pytest.raises(UsageError, match=message):
        load_corpus(paths)
    with pytest.raises(UsageError, match="load_corpus's val_paths must be"):
        load_corpus(["x.txt"], val_paths=7)


def test_a_link_to_nothing_is_said_to_be_one(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")  # (a loop)
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere.txt")
    for link in ("a", "gone"):
        with pytest.raises(UsageError, match="a symbolic link to nothing that exists"):
            load_corpus([tmp_path / link])


def test_text_whose_every_character_is_skipped_is_not_called_empty(tmp_path):
    from collections import Counter

    from tfcli.corpus import encode_text
    (tmp_path / "x.txt").write_text("xxxx")
    with pytest.raises(UsageError, match="every character was skipped"):
        encode_text([tmp_path / "x.txt"], Vocab.from_text("ab"), skipped=Counter())


def test_one_validation_file_may_be_named_as_a_string_and_no_thread_is_left_behind(tmp_path):
    import threading

    (tmp_path / "t.txt").write_text("hello world, " * 20)
    (tmp_path / "v.txt").write_text("hello there")
    before = {t.name for t in threading.enumerate()}
    corpus = load_corpus(str(tmp_path / "t.txt"), val_paths=str(tmp_path / "v.txt"))
    assert len(corpus.val) == len("hello there") and {t.name for t in threading.enumerate()} == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_pipe_named_as_a_corpus_is_refused_with_what_to_do(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # (what `tfcli train <(zcat x.gz)` names: /dev/fd/63)
    with pytest.raises(UsageError, match=r"pipe: not a regular file \(a pipe, as <\(\.\.\.\) gives\); save the "
                                         "text to a file and name that$"):
        read_text([tmp_path / "pipe"])
