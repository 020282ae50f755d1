import json
import os
import pickle

import pytest
import torch
from conftest import make_model
from safetensors.torch import save as st_save

from tfcli import checkpoint as ckpt
from tfcli.corpus import Vocab
from tfcli.errors import TfcliError, UsageError, command_line
from tfcli.native_decoder import NativeModel

VOCAB = Vocab.from_text("abc\n🙂")


class CreatesFile:
    """Unpickling this creates the file at `path`: proof of whether a loader ran pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def saved(tmp_path):
    model = make_model(VOCAB, block_size=8)
    path = tmp_path / "run" / ckpt.MODEL_FILE
    ckpt.save_model(path, model, VOCAB, {"step": 7, "val_loss": 1.25})
    return model, path


def test_saved_model_loads_with_identical_weights_config_and_vocab(saved):
    model, path = saved
    ck = ckpt.load_checkpoint(path)
    assert ck.config == model.config
    assert ck.vocab == VOCAB
    assert ck.summary == {"step": 7, "val_loss": 1.25}
    assert ck.state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v), k


def test_load_model_gives_a_ready_model_from_a_run_directory(saved):
    model, path = saved
    loaded = ckpt.load_model(path.parent)
    assert not loaded.training
    assert loaded.vocab == VOCAB and loaded.summary["step"] == 7 and loaded.path == path
    ids = torch.tensor([[0, 1, 2, 3, 4]])
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "f.bin"
    ckpt.atomic_write(path, b"old")
    ckpt.atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    ckpt.atomic_write(path, b"old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.os, "replace", broken_replace)
    with pytest.raises(OSError):
        ckpt.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_save_says_earlier_checkpoints_are_untouched(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(TfcliError, match="disk full; earlier checkpoints are untouched"):
        ckpt.save_model(tmp_path / ckpt.MODEL_FILE, make_model(VOCAB), VOCAB, {})


def test_truncated_checkpoint_is_refused(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TfcliError, match="not a readable safetensors file"):
        ckpt.load_model(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(TfcliError, match="not a readable safetensors file"):
        ckpt.load_checkpoint(path)


def test_a_file_that_is_no_checkpoint_at_all_is_a_usage_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\n")
    with pytest.raises(UsageError, match="not a checkpoint; give a run directory or a .safetensors file"):
        ckpt.load_model(path)
    with command_line(), pytest.raises(UsageError, match="not a checkpoint; -m takes a run directory or a .safe"):
        ckpt.load_model(path)
    with pytest.raises(UsageError, match=r"^load takes a run directory or a .safetensors file \(a str or Path\), got"):
        ckpt.load_model(123)


def test_a_checkpoint_is_known_by_its_content_not_its_name(saved):
    _, path = saved
    copy = path.with_name("model.bak")
    copy.write_bytes(path.read_bytes())
    assert ckpt.load_model(copy).num_params() == ckpt.load_model(path).num_params()


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(st_save({"weight": torch.zeros(3)}, metadata={"format": "pt"}))
    with pytest.raises(TfcliError, match="a safetensors file, but not a tfcli checkpoint"):
        ckpt.load_model(path)


def test_checkpoint_from_a_newer_version_asks_for_an_upgrade(saved):
    _, path = saved
    ck = ckpt.load_checkpoint(path)
    meta = {"format": "tfcli", "format_version": str(ckpt.FORMAT_VERSION + 1),
            "config": json.dumps(ck.config.to_dict()), "vocab": json.dumps(ck.vocab.chars)}
    path.write_bytes(st_save(ck.state_dict, metadata=meta))
    with pytest.raises(TfcliError, match="newer tfcli.*upgrade"):
        ckpt.load_model(path)


@pytest.mark.parametrize("meta, message", [
    ({"format_version": "one"}, "damaged tfcli checkpoint"),
    ({"config": None}, "damaged tfcli checkpoint"),
    ({"vocab": json.dumps("ab")}, "vocabulary does not match config"),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 8})},
     r"weights do not match its config: blocks\.2\..* is missing"),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 8})},
     r"weights do not match its config: wte\.weight is \(\d+, 32\), the config makes \(\d+, 64\)"),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 2, "n_head": 3, "n_embd": 32, "block_size": 8})},
     r"damaged tfcli checkpoint \(its config: n_embd=32 must be divisible by n_head=3\)"),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 0})},
     r"damaged tfcli checkpoint \(its config: block_size must be positive"),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 2, "n_head": "2", "n_embd": 32, "block_size": 8})},
     r"damaged tfcli checkpoint \(its config: .*\"n_head\": \"2\""),
    ({"config": json.dumps({"vocab_size": len(VOCAB), "n_layer": 2, "n_head": 2, "n_embd": 32.0, "block_size": 8})},
     r"damaged tfcli checkpoint \(its config: .*32\.0"),
    ({"vocab": "123"}, r"damaged tfcli checkpoint \(its vocab must be a string"),
    ({"summary": "[1, 2]"}, r"damaged tfcli checkpoint \(its vocab must be a string and its summary an object"),
], ids=["bad-version", "no-config", "short-vocab", "wrong-weights", "wrong-width", "heads-do-not-divide", "no-context",
        "text-for-a-number", "float-width", "number-for-a-vocab", "list-for-a-summary"])
def test_damaged_metadata_is_refused(saved, meta, message):
    _, path = saved
    ck = ckpt.load_checkpoint(path)
    full = {"format": "tfcli", "format_version": "1", "config": json.dumps(ck.config.to_dict()),
            "vocab": json.dumps(ck.vocab.chars), **meta}
    path.write_bytes(st_save(ck.state_dict, metadata={k: v for k, v in full.items() if v is not None}))
    with pytest.raises(TfcliError, match=message):
        ckpt.load_model(path)
    with command_line(), pytest.raises(TfcliError, match=message):  # (what `tfcli sample` reads, without torch:
        NativeModel.load(path)                                       # a config's fields, no flags, even there)


@pytest.mark.parametrize("dump", [pickle.dumps, torch.save], ids=["pickle", "torch.save"])
def test_pickle_renamed_safetensors_is_refused_and_never_unpickled(tmp_path, dump):
    planted = tmp_path / "pwned"
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFile(proof))).close()
    assert proof.exists()  # the plant works: unpickling it creates a file

    path = tmp_path / "model.safetensors"
    if dump is torch.save:
        torch.save({"w": CreatesFile(planted)}, path)
    else:
        path.write_bytes(pickle.dumps({"w": CreatesFile(planted)}))
    for load in (ckpt.load_checkpoint, ckpt.load_model, ckpt.load_state):
        with pytest.raises(TfcliError, match="never loads pickled"):
            load(path)
    assert not planted.exists()


def test_missing_checkpoint_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint file"):
        ckpt.load_checkpoint(tmp_path / "none.safetensors")


def test_resume_state_round_trips(tmp_path):
    tensors = {"model.w": torch.randn(3, 4), "rng.torch": torch.get_rng_state()}
    ckpt.save_state(tmp_path / ckpt.STATE_FILE, tensors, {"step": 5, "config_hash": "abc"})
    got, state = ckpt.load_state(tmp_path / ckpt.STATE_FILE)
    assert state == {"step": 5, "config_hash": "abc"}
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], v) for k, v in tensors.items())


def test_model_file_is_not_mistaken_for_resume_state(saved):
    _, path = saved
    with pytest.raises(TfcliError, match="damaged resume state"):
        ckpt.load_state(path)


def test_resume_state_named_as_a_model_says_what_it_is(tmp_path):
    ckpt.save_state(tmp_path / ckpt.STATE_FILE, {"model.w": torch.randn(2)}, {"step": 5})
    with pytest.raises(UsageError, match=r"optimizer state .* not a model; give its run directory"):
        ckpt.load_checkpoint(tmp_path / ckpt.STATE_FILE)


def test_weights_damaged_into_nan_on_disk_are_refused(saved):
    from safetensors import safe_open
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["head.weight"].view(-1)[:5] = float("nan")  # as bytes overwritten with 0xff read
    path.write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(TfcliError, match=r"damaged tfcli checkpoint \(non-finite weights in head\.weight\)"):
        ckpt.load_checkpoint(path)


def test_fresh_run_moves_an_unsaved_run_s_metrics_aside_and_a_resumed_one_keeps_them(tmp_path):
    ckpt.append_metrics(tmp_path, {"step": 54})  # a run killed before its first save
    ckpt.make_run_dir(tmp_path, fresh=False)
    assert (tmp_path / ckpt.METRICS_FILE).exists()
    ckpt.make_run_dir(tmp_path, fresh=True)
    assert not (tmp_path / ckpt.METRICS_FILE).exists()
    ckpt.append_metrics(tmp_path, {"step": 3})  # and a second such run: neither log is lost
    ckpt.make_run_dir(tmp_path, fresh=True)
    assert json.loads((tmp_path / (ckpt.METRICS_FILE + ".prev1")).read_text()) == {"step": 54}
    assert json.loads((tmp_path / (ckpt.METRICS_FILE + ".prev2")).read_text()) == {"step": 3}


def test_metrics_are_appended_as_json_lines(tmp_path):
    ckpt.append_metrics(tmp_path, {"step": 1, "loss": 2.5})
    ckpt.append_metrics(tmp_path, {"step": 2, "val_loss": None})
    lines = (tmp_path / ckpt.METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.5}, {"step": 2, "val_loss": None}]


def make_run(root, name: str, mtime: float):
    path = root / name / ckpt.MODEL_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))
    return path


def test_no_path_means_the_most_recent_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs", "old", 1_000_000)
    newest = make_run(tmp_path / "runs", "new", 3_000_000)
    make_run(tmp_path / "runs", "middle", 2_000_000)
    (tmp_path / "runs" / "crashed").mkdir()
    assert ckpt.resolve_model_path(None).resolve() == newest.resolve()


def test_no_runs_at_all_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="no trained model found under ./runs; train one with tfcli.train, or give"):
        ckpt.resolve_model_path(None)
    with command_line(), pytest.raises(UsageError, match="under ./runs; train one with `tfcli train FILE` or pass -m"):
        ckpt.resolve_model_path(None)


def test_run_directory_resolves_to_its_model_file(tmp_path):
    path = make_run(tmp_path, "r", 1_000_000)
    assert ckpt.resolve_model_path(path.parent) == path
    assert ckpt.resolve_model_path(path) == path


def test_directory_without_a_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match="holds no model.safetensors"):
        ckpt.resolve_model_path(tmp_path)
    with pytest.raises(UsageError, match="no such run directory"):
        ckpt.resolve_model_path(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # a run before its first save
    with pytest.raises(UsageError, match="a run with no model saved yet"):
        ckpt.resolve_model_path(tmp_path)


def test_default_run_dir_never_reuses_an_existing_run(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text("x")
    root = tmp_path / "runs"
    assert ckpt.default_run_dir([corpus], root) == root / "poems"
    make_run(root, "poems", 1_000_000)
    assert ckpt.default_run_dir([corpus], root) == root / "poems-2"
    (root / "poems-2").mkdir()
    (root / "poems-2" / ckpt.STATE_FILE).write_bytes(b"")  # a run interrupted before its first model save
    assert ckpt.default_run_dir([corpus], root) == root / "poems-3"


def test_default_run_dir_goes_past_a_file_of_the_run_s_name(tmp_path):
    root, corpus = tmp_path / "runs", tmp_path / "poems.txt"
    corpus.write_text("x")
    root.mkdir()
    (root / "poems").write_text("my notes")  # (not a run: `train poems.txt` must neither refuse nor touch it)
    assert ckpt.default_run_dir([corpus], root) == root / "poems-2"


def test_default_run_dir_goes_past_a_directory_of_other_things(tmp_path):
    root, corpus = tmp_path / "runs", tmp_path / "poems.txt"
    corpus.write_text("x")
    (root / "poems").mkdir(parents=True)
    (root / "poems" / "draft.txt").write_text("mine")
    assert ckpt.default_run_dir([corpus], root) == root / "poems-2"
    (root / "poems-2").mkdir()
    (root / "poems-2" / ckpt.METRICS_FILE).write_text('{"step": 1}\n')  # a run stopped before its first save
    assert ckpt.default_run_dir([corpus], root) == root / "poems-2"  # (the same command starts it again)


def test_a_fresh_run_is_refused_in_a_directory_of_other_things_which_stay_as_they_were(tmp_path):
    (tmp_path / "names").mkdir()
    for name in ("notes.txt", "config.json", "metrics.jsonl", "more.txt"):
        (tmp_path / name).write_text("mine")
    with pytest.raises(UsageError, match=r"holds other things than a run \(config.json, more.txt, names/ and 1 more\)"
                                         r"; a run needs a new or empty directory"):
        ckpt.make_run_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl", "more.txt", "names",
                                                          "notes.txt"]
    assert all((tmp_path / n).read_text() == "mine" for n in ("notes.txt", "config.json", "metrics.jsonl"))


def test_a_run_s_own_leftovers_do_not_make_a_directory_foreign(tmp_path):
    for name in (ckpt.METRICS_FILE, f"{ckpt.METRICS_FILE}.prev2", f".{ckpt.MODEL_FILE}.x1y2.tmp", ".DS_Store",
                 "Thumbs.db"):  # (nor what a file browser leaves in a directory it opened)
        (tmp_path / name).write_text("")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    assert ckpt.foreign_entries(tmp_path) == []
    ckpt.make_run_dir(tmp_path)  # (not refused)
    assert ckpt.foreign_entries(tmp_path / "not-there") == []


def test_default_run_dir_of_a_directory_is_named_after_it(tmp_path):
    (tmp_path / "books").mkdir()
    assert ckpt.default_run_dir([tmp_path / "books"], tmp_path / "runs") == tmp_path / "runs" / "books"


# -- divergence, unwritable directories, pickles named .pt -------------------------------------

def test_non_finite_weights_are_never_written_over_a_good_checkpoint(saved):
    model, path = saved
    before = path.read_bytes()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(TfcliError, match=r"not writing .*head\.weight holds NaN.*earlier checkpoints are untouched"):
        ckpt.save_model(path, model, VOCAB, {"step": 8})
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(TfcliError, match="holds NaN or infinite values"):
        ckpt.save_state(path.parent / ckpt.STATE_FILE, dict(model.state_dict()), {"step": 8})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [ckpt.MODEL_FILE]


def test_run_directory_under_or_at_a_file_is_a_usage_error_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    for run_dir in (tmp_path / "notes.txt" / "run", tmp_path / "notes.txt"):  # (the user's choice of path)
        with pytest.raises(UsageError, match="notes.txt(/run)?: a file is in the way of the run directory; pick "
                                             "another run_dir$"):
            ckpt.make_run_dir(run_dir)
    with command_line(), pytest.raises(UsageError, match="; pick another --out$"):
        ckpt.make_run_dir(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_metrics_that_cannot_be_written_are_one_error(tmp_path):
    (tmp_path / ckpt.METRICS_FILE).mkdir()  # something that is not a file where the log goes
    with pytest.raises(TfcliError, match="cannot write .*metrics.jsonl: Is a directory"):
        ckpt.append_metrics(tmp_path, {"step": 1})


def test_pt_file_is_named_as_a_pickle_and_never_unpickled(tmp_path):
    planted = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"w": CreatesFile(planted)}, path)
    with pytest.raises(TfcliError, match=r"model\.pt: a pickle \(what torch.save writes.*never loads pickled"):
        ckpt.load_model(path)
    assert not planted.exists()


# -- devices: the file records none; the loader puts weights where asked ------------------------

def test_checkpoint_header_records_no_device(saved):
    _, path = saved
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = header.pop("__metadata__")
    assert set(meta) == {"format", "format_version", "config", "vocab", "summary"}
    assert all(set(entry) == {"dtype", "shape", "data_offsets"} and entry["dtype"] == "F32"
               for entry in header.values())


def test_bfloat16_and_non_contiguous_weights_save_and_load_as_float32(tmp_path):
    model = make_model(VOCAB, block_size=8).to(torch.bfloat16)
    with torch.no_grad():  # a transposed view: what a sharded or tied weight can look like
        model.head.weight.data = model.head.weight.data.t().contiguous().t()
    assert not model.head.weight.is_contiguous()
    ckpt.save_model(tmp_path / ckpt.MODEL_FILE, model, VOCAB, {})
    loaded = ckpt.load_model(tmp_path, device="cpu")
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == "cpu", name
        assert torch.equal(p, model.get_parameter(name).float()), name


def test_load_model_puts_every_tensor_on_the_requested_device(saved):
    _, path = saved
    loaded = ckpt.load_model(path, device="meta")  # a device other than the CPU that every PyTorch has
    assert {t.device.type for t in [*loaded.parameters(), *loaded.buffers()]} == {"meta"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_loading_onto_a_missing_gpu_is_a_usage_error(saved):
    _, path = saved
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        ckpt.load_model(path, device="cuda")


def test_resume_without_out_goes_on_with_the_text_s_latest_run(tmp_path):
    import os

    root, text = tmp_path / "runs", tmp_path / "poems.txt"
    text.write_text("x")
    assert ckpt.latest_run_of([text], root) == root / "poems"  # (none saved yet: the default name)
    for i, name in enumerate(["poems", "poems-2", "poems-x", "poems-10"]):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.STATE_FILE).write_bytes(b"")
        os.utime(root / name / ckpt.STATE_FILE, (1000 + i, 1000 + i))
    os.utime(root / "poems-2" / ckpt.STATE_FILE, (5000, 5000))  # the one saved last
    assert ckpt.latest_run_of([text], root) == root / "poems-2"  # (it resumed runs/poems, the oldest)


def test_a_fifo_given_as_the_model_is_refused_at_once_not_read(tmp_path):
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)  # (opening it to read would wait for a writer for ever)
    with pytest.raises(UsageError, match="not a regular file"):
        ckpt.resolve_model_path(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        ckpt.load_checkpoint(fifo)
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / ckpt.MODEL_FILE)
    with pytest.raises(UsageError, match="not a regular file"):
        ckpt.resolve_model_path(run)


def test_resuming_trims_only_later_steps_and_keeps_every_other_line_byte_for_byte(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [b'{"step": 1, "loss": 2.0}\n', b'{"step": 2, "val_loss": 1.9, "note": "\xff"}\n',  # (not UTF-8)
             b'{"step": 1e999}\n', b'{"elapsed": 3}\n', b'{"step": 3, "lo', b'{"step": 4, "loss": 1.0}\n']
    (run / ckpt.METRICS_FILE).write_bytes(b"".join(lines[:4] + [lines[4] + b"\n", lines[5]]))
    ckpt.make_run_dir(run, fresh=False, resumed_at=2)
    assert (run / ckpt.METRICS_FILE).read_bytes() == b"".join(lines[:4] + [lines[4] + b"\n"])
