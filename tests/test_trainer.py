import json
import math
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tfcli import checkpoint as ckpt
from tfcli.config import ModelConfig, SampleConfig, TrainConfig
from tfcli.corpus import load_corpus
from tfcli.errors import TfcliError, UsageError, command_line
from tfcli.evaluation import evaluate
from tfcli.model import GPT
from tfcli.sampling import generate
from tfcli.tokens import TokenCache
from tfcli.trainer import (
    Done,
    Eval,
    Notice,
    Sample,
    Start,
    Step,
    get_batch,
    lr_at,
    train,
    val_sample,
    warn_slow_steps,
)

PATTERN = "abcabd"  # after "ab", only the character before it tells c from d: a model must use its context
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
TRAIN = TrainConfig(max_steps=100, batch_size=16, lr=3e-3, warmup_steps=10, device="cpu", dtype="float32",
                    eval_interval=1e9, sample_chars=20, seed=3)


def unigram_entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())


def write(tmp_path, text: str, name: str = "t.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


class StopAfter:
    """A should_stop flag that rises at its `n`th poll (one after each step, one after each validation)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self) -> bool:
        self.n -= 1
        return self.n <= 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    corpus = load_corpus([write(tmp, PATTERN * 200)])
    events = []
    done = train(corpus, MODEL, TRAIN, tmp / "run", events.append)
    return corpus, tmp / "run", events, done


def test_short_run_learns_the_pattern(trained):
    corpus, run_dir, _, done = trained
    model = ckpt.load_model(run_dir)
    entropy = unigram_entropy(PATTERN * 200)
    assert evaluate(model, corpus.train).loss < 0.2 * entropy
    assert done.val_loss < 0.2 * entropy


def test_trained_model_continues_the_pattern(trained):
    model = ckpt.load_model(trained[1])
    text = "".join(p[0] for p in generate(model, model.vocab, "abcab", SampleConfig(max_new_tokens=25,
                                                                                   temperature=0.0, seed=1)))
    assert text == "dabcabdabcabdabcabdabcabd"


def test_run_ends_at_max_steps(trained):
    _, run_dir, _, done = trained
    assert (done.step, done.reason, done.run_dir) == (100, "steps", run_dir)
    assert ckpt.load_checkpoint(run_dir / ckpt.MODEL_FILE).summary["step"] == 100


def test_run_directory_holds_model_best_state_and_metrics(trained):
    _, run_dir, _, done = trained
    assert {p.name for p in run_dir.iterdir()} == {ckpt.MODEL_FILE, ckpt.BEST_FILE, ckpt.STATE_FILE,
                                                   ckpt.METRICS_FILE}
    summary = ckpt.load_checkpoint(run_dir / ckpt.MODEL_FILE).summary
    assert summary["ended"] == "steps" and summary["val_loss"] == done.val_loss
    assert ckpt.load_checkpoint(run_dir / ckpt.BEST_FILE).summary == {"step": 100, "val_loss": done.best_val_loss}
    records = [json.loads(line) for line in (run_dir / ckpt.METRICS_FILE).read_text().splitlines()]
    assert records[0]["step"] == 1 and "loss" in records[0]
    assert records[-1]["step"] == 100 and records[-1]["val_loss"] == done.val_loss


def test_events_start_first_then_steps_then_the_final_eval_and_sample(trained):
    _, _, events, done = trained
    assert isinstance(events[0], Start)
    assert events[0].start_step == 0 and events[0].model.vocab_size == 4 and events[0].device == "cpu"
    assert events[0].processes == 1
    steps = [e.step for e in events if isinstance(e, Step)]
    assert steps[0] == 1 and steps == sorted(steps) and steps[-1] == 100  # (the last step's own figures)
    last_step = max(i for i, e in enumerate(events) if isinstance(e, Step))
    assert isinstance(events[last_step + 1], Eval)  # (so a display shows the final validation beside it)
    tail = [e for e in events if not isinstance(e, Done)][-2:]  # Done, once emitted, comes after them
    assert isinstance(tail[0], Eval) and tail[0].step == 100 and tail[0].val_loss == done.val_loss
    assert isinstance(tail[1], Sample) and tail[1].step == 100 and set(tail[1].text) <= set(PATTERN)


def test_done_is_the_last_event(trained):
    _, _, events, done = trained
    assert events[-1] == done


def test_final_metrics_line_is_strict_json(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=1), tmp_path / "run", events.append)
    assert all(math.isfinite(e.train_loss) for e in events if isinstance(e, Eval))

    def refuse(name):
        raise ValueError(name)

    for line in (tmp_path / "run" / ckpt.METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=refuse)


def test_should_stop_saves_and_reports_interrupted_without_validating_again(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    done = train(corpus, MODEL, replace(TRAIN, eval_steps=3), tmp_path / "run", events.append,
                 should_stop=StopAfter(8))  # (steps 1-3, step 3's validation, steps 4-6, and then step 6's)
    assert (done.step, done.reason) == (6, "interrupted")
    evals = [e for e in events if isinstance(e, Eval)]
    assert [e.step for e in evals] == [3, 6]  # no validation (nor sample) again after Ctrl-C: it saves and goes
    assert (done.val_loss, done.val_step) == (evals[-1].val_loss, 6)
    summary = ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary
    assert (summary["step"], summary["ended"], summary["val_step"]) == (6, "interrupted", 6)
    assert (tmp_path / "run" / ckpt.STATE_FILE).is_file()


def test_a_stop_at_a_step_due_for_validation_saves_without_it(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    done = train(corpus, MODEL, replace(TRAIN, eval_steps=1), tmp_path / "run", events.append,
                 should_stop=StopAfter(3))  # (step 1, its validation, step 2)
    evals = [e for e in events if isinstance(e, Eval)]
    assert [e.step for e in evals] == [1]  # (step 2's validation would only delay the exit)
    assert (done.step, done.reason, done.val_loss, done.val_step) == (2, "interrupted", evals[-1].val_loss, 1)
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["ended"] == "interrupted"


def test_resumed_run_matches_an_uninterrupted_one_exactly(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    cfg = replace(TRAIN, max_steps=30)
    train(corpus, MODEL, cfg, tmp_path / "whole")
    assert train(corpus, MODEL, cfg, tmp_path / "split", should_stop=StopAfter(12)).step == 12
    events = []
    done = train(corpus, MODEL, cfg, tmp_path / "split", events.append, resume=True)
    assert events[0].start_step == 12 and done.step == 30
    whole = ckpt.load_checkpoint(tmp_path / "whole" / ckpt.MODEL_FILE).state_dict
    split = ckpt.load_checkpoint(tmp_path / "split" / ckpt.MODEL_FILE).state_dict
    for k in whole:
        assert torch.equal(whole[k], split[k]), k


@pytest.mark.parametrize("eval_tokens, rewritten", [(TRAIN.eval_tokens, False), (TRAIN.eval_tokens // 2, True)])
def test_resume_keeps_the_best_score_only_when_scored_on_the_same_slice(tmp_path, eval_tokens, rewritten):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run")
    state_path = tmp_path / "run" / ckpt.STATE_FILE
    tensors, state = ckpt.load_state(state_path)
    ckpt.save_state(state_path, tensors, state | {"best_val_loss": 0.0})  # a best no later score beats
    train(corpus, MODEL, replace(TRAIN, max_steps=4, eval_tokens=eval_tokens), tmp_path / "run", resume=True)
    best = ckpt.load_checkpoint(tmp_path / "run" / ckpt.BEST_FILE).summary
    assert (best["step"] == 4) == rewritten


def test_resume_with_another_optimizer_is_refused_and_leaves_the_run_resumable(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=5), tmp_path / "run")
    with pytest.raises(UsageError, match="this run trains with optimizer='muon'"):
        train(corpus, MODEL, replace(TRAIN, max_steps=5, optimizer="adamw"), tmp_path / "run", resume=True)
    assert train(corpus, MODEL, replace(TRAIN, max_steps=7), tmp_path / "run", resume=True).step == 7


def test_resume_from_a_state_with_damaged_moments_says_so(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=5), tmp_path / "run")
    path = tmp_path / "run" / ckpt.STATE_FILE
    with safe_open(path, "pt") as f:  # damaged bytes: written past tfcli's own save, which refuses NaN
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    moment = next(k for k in tensors if k.startswith("opt."))
    tensors[moment] = torch.full_like(tensors[moment], float("nan"))
    save_file(tensors, path, metadata)
    with pytest.raises(TfcliError, match=f"damaged resume state .*{moment}"):
        train(corpus, MODEL, replace(TRAIN, max_steps=7), tmp_path / "run", resume=True)


def test_a_fresh_run_never_overwrites_a_saved_one(tmp_path):
    # the library refuses as the CLI does: a notebook re-running a cell must not lose the model
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=3), tmp_path / "run")
    saved = (tmp_path / "run" / ckpt.MODEL_FILE).read_bytes()
    with pytest.raises(UsageError, match="already holds a run; pass resume=True"):
        train(corpus, MODEL, replace(TRAIN, max_steps=5, seed=2), str(tmp_path / "run"))  # (a string, as in notebooks)
    assert (tmp_path / "run" / ckpt.MODEL_FILE).read_bytes() == saved
    (tmp_path / "run" / ckpt.STATE_FILE).unlink()
    with pytest.raises(UsageError, match="no state.safetensors to resume from, so pick another run_dir$"):
        train(corpus, MODEL, replace(TRAIN, max_steps=5), tmp_path / "run")
    assert train(corpus, MODEL, replace(TRAIN, max_steps=5), str(tmp_path / "run2")).step == 5


def test_a_run_directory_in_use_by_another_training_is_refused(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with ckpt.run_lock(tmp_path / "run"):  # what a training in another process holds
        with pytest.raises(TfcliError, match="in use by another tfcli train"):
            train(corpus, MODEL, replace(TRAIN, max_steps=3), tmp_path / "run")
        assert not (tmp_path / "run" / ckpt.MODEL_FILE).exists()
    assert train(corpus, MODEL, replace(TRAIN, max_steps=3), tmp_path / "run").step == 3  # released


def test_a_default_run_directory_skips_one_in_use(tmp_path):
    text = write(tmp_path, PATTERN * 20, "notes.txt")
    root = tmp_path / "runs"
    assert ckpt.default_run_dir([text], root) == root / "notes"
    with ckpt.run_lock(root / "notes"):  # a training that has not saved yet: no model to see
        assert ckpt.default_run_dir([text], root) == root / "notes-2"
    assert ckpt.default_run_dir([text], root) == root / "notes"


def test_a_run_refused_before_it_writes_leaves_no_empty_directory(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match="grad_accum=3 does not split"):
        train(corpus, MODEL, replace(TRAIN, grad_accum=3), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_resume_with_a_changed_corpus_is_refused(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run")
    changed = load_corpus([write(tmp_path, "abcabc" + PATTERN * 19, "u.txt")])
    assert changed.vocab == corpus.vocab
    with pytest.raises(UsageError, match=r"corpus or model settings differ .*\(its model settings match: the training "
                                         r"text is another, or the same text split another way: val_paths and "):
        train(changed, MODEL, replace(TRAIN, max_steps=4), tmp_path / "run", resume=True)
    with pytest.raises(UsageError, match=r"\(n_layer=3, the run's 2; dropout=0.1, the run's 0.0\)"):
        train(corpus, replace(MODEL, n_layer=3, dropout=0.1), replace(TRAIN, max_steps=4), tmp_path / "run",
              resume=True)


def test_resume_without_a_run_says_so(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match="nothing to resume"):
        train(corpus, MODEL, TRAIN, tmp_path / "run", resume=True)


def test_corpus_shorter_than_the_context_shrinks_it_with_a_notice(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 2)], val_fraction=0.0)
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run", events.append)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert "the training text is shorter than the context; context shrunk to 10" in notices
    assert next(e for e in events if isinstance(e, Start)).model.block_size == 10
    assert ckpt.load_model(tmp_path / "run").config.block_size == 10


def test_without_an_on_event_a_notice_is_a_python_warning(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 2)], val_fraction=0.0)
    shrunk = "^the training text is shorter than the context; context shrunk to 10$"
    with pytest.warns(UserWarning, match=shrunk) as said:
        train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run")
    assert {w.filename for w in said} == {__file__}  # (the caller's line, not tfcli/trainer.py's)


def test_hopelessly_short_corpus_is_refused(tmp_path):
    corpus = load_corpus([write(tmp_path, "abcab")], val_fraction=0.0)
    with pytest.raises(UsageError, match="too short to train on"):
        train(corpus, MODEL, TRAIN, tmp_path / "run")


def test_a_short_corpus_cut_for_validation_is_told_how_to_keep_it_all(tmp_path):
    corpus = load_corpus([write(tmp_path, "abcdefghij")], val_fraction=0.1)
    with pytest.raises(UsageError, match=r"has 9 characters once 1 is held out .* val_fraction=0 holds none out"):
        train(corpus, MODEL, TRAIN, tmp_path / "run")
    with command_line(), pytest.raises(UsageError, match=r"; --val-fraction 0 holds none out"):
        train(corpus, MODEL, TRAIN, tmp_path / "run")
    (tmp_path / "v.txt").write_text("abc")
    corpus = load_corpus([write(tmp_path, "abcdefgh")], val_paths=[tmp_path / "v.txt"])
    with pytest.raises(UsageError, match=r"has 8 characters: too short to train on \(need at least 10\)$"):
        train(corpus, MODEL, TRAIN, tmp_path / "run")


def test_no_validation_text_trains_without_validation(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 10)], val_fraction=0.0)
    events = []
    done = train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run", events.append)
    assert Notice("no validation text (none held out); training without validation") in events
    assert done.val_loss is None and done.best_val_loss is None
    assert not (tmp_path / "run" / ckpt.BEST_FILE).exists()


def test_diverging_loss_is_an_error_naming_the_lr(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(TfcliError, match=r"training diverged: loss is nan.*lower lr \(now 1e\+30\)"):
        train(corpus, MODEL, replace(TRAIN, lr=1e30, warmup_steps=1), tmp_path / "run")


def test_a_budget_is_required(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match="give a budget"):
        train(corpus, MODEL, replace(TRAIN, max_steps=None), tmp_path / "run")


@pytest.mark.parametrize("bad, message", [({"max_steps": 0}, "^max_steps must"), ({"lr": -1.0}, "^lr must"),
                                          ({"batch_size": 0}, "^batch_size must")])
def test_a_notebooks_config_is_checked_as_the_clis_flags_are(tmp_path, bad, message):
    # max_steps=0 used to mean "no step limit": with no --time, a run that never ended
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match=message):
        train(corpus, MODEL, replace(TRAIN, **bad), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.fixture
def clock(monkeypatch) -> SimpleNamespace:
    """The trainer's clock, moved on only by its steps (step_s each) and validations (val_s each), so
    what a time budget does is tested exactly, however loaded the host is."""
    from tfcli import trainer

    clock = SimpleNamespace(now=0.0, step_s=0.1, val_s=0.5)
    monkeypatch.setattr(trainer, "time", SimpleNamespace(monotonic=lambda: clock.now))
    real_step, real_val = trainer.train_step, trainer.val_loss

    def step(*args, **kwargs):
        clock.now += clock.step_s
        return real_step(*args, **kwargs)

    def validation(*args, **kwargs):
        clock.now += clock.val_s
        return real_val(*args, **kwargs)
    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer, "val_loss", validation)
    return clock


def test_time_budget_ends_the_run(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    done = train(corpus, MODEL, replace(TRAIN, max_steps=None, time_budget=3.0), tmp_path / "run")
    assert done.reason == "time" and done.step > 0  # (on the real clock; how exactly: the tests below)
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["step"] == done.step


@pytest.mark.parametrize("step_s, steps", [(0.4, 3), (0.9, 1)])
def test_no_step_is_begun_that_would_end_past_the_time_budget(tmp_path, clock, step_s, steps):
    clock.step_s = step_s
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    cfg = replace(TRAIN, max_steps=None, time_budget=2.0, eval_interval=100.0, compile=False)
    done = train(corpus, MODEL, cfg, tmp_path / "run", started_at=0.0)
    # 0.5 s is kept for the final validation, so steps may end by 1.5 s: 0.4, 0.8 and 1.2 (a fourth would end
    # at 1.6); or one of 0.9 s (known from the first: a second would end at 1.8)
    assert done.reason == "time" and done.step == steps and done.elapsed <= cfg.time_budget


def test_a_budget_spent_before_the_first_step_is_refused_and_leaves_no_run(tmp_path, clock):
    """`--time 0.5s` saved an untrained model as the run, the one `sample` picks next, and exited 0."""
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    cfg = replace(TRAIN, max_steps=None, time_budget=0.4, eval_interval=100.0, compile=False)  # (0.5 s is kept)
    with pytest.raises(UsageError, match=r"^time_budget \(0.4 s\) ran out before the first step: starting up took "
                                         r"[\d.]+ s, and 0.5 s is kept for the final validation and save; give it more "
                                         r"than 1 s$"):
        train(corpus, MODEL, cfg, tmp_path / "run", started_at=0.0)
    assert not (tmp_path / "run").exists()
    clock.step_s = 0.4
    done = train(corpus, MODEL, replace(cfg, time_budget=1.0), tmp_path / "run", started_at=0.0)
    assert done.step == 1 and (tmp_path / "run" / ckpt.MODEL_FILE).is_file()  # (one step fits: the run is made)


def test_a_ctrl_c_during_the_final_validation_cuts_it_short_and_saves_the_run_as_interrupted(tmp_path, monkeypatch):
    """It was heard only after the validation and its sample, and the run then said it had finished."""
    from tfcli import trainer

    asked = SimpleNamespace(stop=False, stretches=0)
    real = trainer.evaluate

    def evaluating(*args, **kwargs):
        asked.stop, asked.stretches = True, asked.stretches + 1  # (the Ctrl-C lands in the first stretch)
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer, "evaluate", evaluating)
    corpus = load_corpus([write(tmp_path, PATTERN * 200)])
    events = []
    cfg = replace(TRAIN, max_steps=3, eval_steps=None, eval_interval=1e6, eval_tokens=64)
    done = train(corpus, MODEL, cfg, tmp_path / "run", events.append, should_stop=lambda: asked.stop)
    assert done.reason == "interrupted" and done.step == 3 and asked.stretches == 1  # (of 8)
    assert not any(isinstance(e, (Eval, Sample)) for e in events)
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["step"] == 3  # saved, to --resume


def test_batches_from_a_memory_map_equal_those_from_memory(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 251
    ids.tofile(tmp_path / "ids")
    mapped = np.memmap(tmp_path / "ids", dtype=np.uint16, mode="r")
    x1, y1 = get_batch(ids, 6, 16, torch.Generator().manual_seed(0), "cpu")
    x2, y2 = get_batch(mapped, 6, 16, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # y is x shifted by one


def test_a_share_of_a_batch_is_those_rows_of_the_whole_batch():
    ids = np.arange(500, dtype=np.uint8)
    whole, _ = get_batch(ids, 8, 10, torch.Generator().manual_seed(1), "cpu")
    part, _ = get_batch(ids, 8, 10, torch.Generator().manual_seed(1), "cpu", slice(4, 8))
    assert torch.equal(part, whole[4:8])


def test_short_val_split_is_scored_whole():
    val = np.arange(100)
    assert [p.tolist() for p in val_sample(val, 1000)] == [val.tolist()]
    assert val_sample(val[:1], 1000) == []


@pytest.mark.parametrize("length", [10_000, 1_000_000])
def test_long_val_split_is_sampled_at_a_fixed_size_across_its_length(length):
    val = np.arange(length)
    pieces = val_sample(val, 800, pieces=8)
    assert len(pieces) == 8 and sum(len(p) for p in pieces) == 8 * 101  # the same cost however long the split
    assert pieces[0][0] == 0 and pieces[-1][-1] == length - 1  # from its start to its end
    assert all(np.all(np.diff(p) == 1) for p in pieces)  # each piece is contiguous text


def test_memory_mapped_corpus_trains_exactly_like_one_in_memory(tmp_path):
    path = write(tmp_path, PATTERN * 20)
    held = load_corpus([path])
    mapped = load_corpus([path], store=TokenCache(tmp_path / "cache"))
    assert isinstance(mapped.train, np.memmap)
    cfg = replace(TRAIN, max_steps=5)
    train(held, MODEL, cfg, tmp_path / "held")
    train(mapped, MODEL, cfg, tmp_path / "mapped")
    a = ckpt.load_checkpoint(tmp_path / "held" / ckpt.MODEL_FILE).state_dict
    b = ckpt.load_checkpoint(tmp_path / "mapped" / ckpt.MODEL_FILE).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def _fp16_step(scaler):
    from tfcli.model import GPT
    from tfcli.optim import make_optimizer
    from tfcli.trainer import train_step

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=7, n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    ids = torch.randint(7, (4, 8), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, model, opt, ids, ids.roll(-1, 1), torch.device("cpu"), torch.float16, 1.0, scaler)
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    return loss, moved


def test_float16_training_scales_the_loss_and_steps():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loss, moved = _fp16_step(scaler)
    assert math.isfinite(loss) and any(moved)
    assert scaler.get_scale() == 2.0**10  # no overflow: the scale stays until its growth interval


def test_float16_step_whose_gradients_overflow_is_skipped_and_the_scale_lowered():
    scaler = torch.amp.GradScaler("cpu", init_scale=1e30)  # the scaled loss overflows float16
    _, moved = _fp16_step(scaler)
    assert not any(moved)
    assert scaler.get_scale() < 1e30


def _one_step(accum: int):
    from tfcli.model import GPT
    from tfcli.trainer import train_step

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=9, n_layer=2, n_head=2, n_embd=16, block_size=8))
    for p in model.parameters():  # non-zero projections, so every weight gets a gradient
        torch.nn.init.normal_(p, std=0.2)
    # plain SGD: a step is the gradient times the lr, so the weights compare the gradients to fp32 rounding
    # (Muon's bfloat16 Newton-Schulz turns rounding into 1e-5 differences on some CPUs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(9, (8, 9), generator=torch.Generator().manual_seed(2))
    loss = train_step(model, model, opt, ids[:, :-1], ids[:, 1:], torch.device("cpu"), torch.float32, 1e9,
                      accum=accum)
    return loss, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_takes_the_whole_batch_step(accum):
    loss, weights = _one_step(1)
    loss_acc, weights_acc = _one_step(accum)
    assert loss_acc == pytest.approx(loss, abs=1e-6)
    for w, wa in zip(weights, weights_acc):
        torch.testing.assert_close(wa, w, atol=2e-6, rtol=1e-5)


def test_grad_accum_that_does_not_split_the_batch_is_refused(tmp_path):
    corpus = load_corpus([write(tmp_path, "abcdefgh" * 40)])
    cfg = TrainConfig(batch_size=6, grad_accum=4, max_steps=1)
    with pytest.raises(UsageError, match="grad_accum=4 does not split"):
        train(corpus, ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / ckpt.MODEL_FILE).exists()


def test_each_group_follows_the_schedule_times_its_lr_scale(tmp_path, monkeypatch):
    import tfcli.trainer as trainer_module
    from tfcli.optim import EMBEDDING_LR_SCALE
    seen = []
    real_step = trainer_module.train_step

    def spy(step_fn, model, opt, *args, **kwargs):
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        seen.append((lrs[id(model.wte.weight)], lrs[id(model.head.weight)], lrs[id(model.blocks[0].mlp.fc.weight)]))
        return real_step(step_fn, model, opt, *args, **kwargs)
    monkeypatch.setattr(trainer_module, "train_step", spy)
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=3, optimizer="muon"), tmp_path / "run")
    assert len(seen) == 3
    for step, (embedding, head, hidden) in enumerate(seen):
        assert hidden == head == pytest.approx(lr_at(step / 3, step, replace(TRAIN, max_steps=3)))
        assert embedding == pytest.approx(EMBEDDING_LR_SCALE * head)


def test_a_run_given_epochs_ends_there_and_says_so(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 200)])
    cfg = replace(TRAIN, max_steps=None, epochs=2.0, batch_size=8)
    done = train(corpus, MODEL, cfg, tmp_path / "run")
    assert (done.step, done.reason) == (math.ceil(2.0 * len(corpus.train) / (8 * MODEL.block_size)), "epochs")


def test_a_run_ending_on_a_validation_step_validates_there_once(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 200)])
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=18, eval_steps=6), tmp_path / "run", events.append)
    assert [e.step for e in events if isinstance(e, Eval)] == [6, 12, 18]


def test_fast_runs_validate_every_eval_steps_and_remember_where_the_best_was(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 200)])
    events = []
    done = train(corpus, MODEL, replace(TRAIN, max_steps=20, eval_steps=6), tmp_path / "run", events.append)
    evals = [e for e in events if isinstance(e, Eval)]
    assert [e.step for e in evals] == [6, 12, 18, 20]  # the interval (1e9 s) never comes due
    best = [e.step for e in evals if e.best][-1]
    assert done.best_step == best == ckpt.load_checkpoint(tmp_path / "run" / ckpt.BEST_FILE).summary["step"]
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["best_step"] == best


def test_a_step_of_minutes_is_announced_and_a_step_of_moments_is_not():
    events = []
    for block_size in (16, 100_000):  # attention costs the context's square: ~4e14 FLOPs a step at 100K
        warn_slow_steps(GPT(replace(MODEL, vocab_size=4, block_size=block_size)), 16, events.append)
    [notice] = events
    assert "min of CPU work" in notice.message and "context 100,000" in notice.message


def test_a_step_longer_than_the_time_budget_is_announced_unless_it_is_a_few_seconds():
    model = GPT(replace(MODEL, vocab_size=4))
    work = 16 * MODEL.block_size * model.flops_per_token()  # a step of 16 sequences
    events = []
    warn_slow_steps(model, 16, events.append, rate=work / 30, budget=20.0)  # a 30 s step in a 20 s budget
    warn_slow_steps(model, 16, events.append, rate=work / 30, budget=60.0)  # fits, and under a minute
    warn_slow_steps(model, 16, events.append, rate=work / 5, budget=1.0)  # 5 s: not worth a word
    warn_slow_steps(model, 16, events.append, rate=work / 30)  # (no budget)
    [notice] = events
    assert notice.message.startswith("one step of this model is about 30 s of CPU work (context 16, batch 16), "
                                     "longer than the time budget; Ctrl-C and time_budget act between steps")


def test_compile_on_trains_through_the_compiled_model(tmp_path, monkeypatch):
    compiled = []

    def spy(model, **kwargs):  # records what would be compiled; compiling itself is test_device's (slow) test
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: True)
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=2, compile=True), tmp_path / "run", events.append)
    start = next(e for e in events if isinstance(e, Start))
    assert start.compiled and len(compiled) == 1


def test_a_compiler_that_cannot_build_leaves_the_run_uncompiled_and_otherwise_the_same(tmp_path, monkeypatch):
    """A g++ that is there but does not work (macOS without its tools, no Python headers) failed
    the whole run at its first step."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    def broken(*args, **kwargs):
        raise InductorError(InvalidCxxCompiler(), None)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: broken)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: True)
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    done = train(corpus, MODEL, replace(TRAIN, max_steps=3, compile=True), tmp_path / "run", events.append)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any(n.startswith("torch.compile could not build this model (InvalidCxxCompiler: No working C++")
               and n.endswith("training uncompiled") for n in notices), notices
    eager = train(corpus, MODEL, replace(TRAIN, max_steps=3, compile=False), tmp_path / "eager")
    assert done.step == 3 and done.val_loss == eager.val_loss
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["compiled"] is False

    def other(*args, **kwargs):  # anything else the model raises is not the compiler's, and is not hidden
        raise ValueError("a bug")
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: other)
    with pytest.raises(ValueError, match="a bug"):
        train(corpus, MODEL, replace(TRAIN, max_steps=3, compile=True), tmp_path / "third")


def test_compiling_asked_for_without_a_compiler_says_it_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr("tfcli.device.can_compile", lambda: False)
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=2, compile=True), tmp_path / "run", events.append)
    assert not next(e for e in events if isinstance(e, Start)).compiled
    assert any("none was found; training uncompiled" in e.message for e in events if isinstance(e, Notice))
    events.clear()
    train(corpus, MODEL, replace(TRAIN, max_steps=2, compile=None), tmp_path / "default", events.append)
    assert not any(isinstance(e, Notice) and "compil" in e.message for e in events)  # (not asked: nothing to say)


def test_a_resumed_timed_run_takes_the_schedule_on_from_where_it_stopped(tmp_path, clock):
    clock.step_s, clock.val_s = 0.05, 0.2
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    timed = replace(TRAIN, max_steps=None, time_budget=3.0, warmup_steps=1)
    first = train(corpus, MODEL, timed, tmp_path / "run")
    stopped_at = ckpt.load_state(tmp_path / "run" / ckpt.STATE_FILE)[1]["progress"]
    assert first.reason == "time" and stopped_at > 0.8  # (the final validation's reserve is the rest)
    events = []
    train(corpus, MODEL, replace(timed, time_budget=2.0), tmp_path / "run", events.append, resume=True)
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[0].progress >= stopped_at
    assert all(e.lr <= lr_at(stopped_at, e.step, timed) for e in steps)  # on in the cooldown, never back to the peak
    assert steps[0].lr < 0.5 * TRAIN.lr


def test_a_run_that_learnt_carriage_returns_is_told_why_its_text_now_differs(tmp_path):
    from conftest import make_model

    from tfcli.corpus import Vocab
    from tfcli.trainer import _what_differs

    for chars, said in (("ab\r\n", "it learnt \\r as a character"), ("ab\n", "the training text is another, or "
                                                                            "the same text split another way")):
        model = make_model(Vocab.from_text(chars))
        (tmp_path / chars.encode().hex()).mkdir()
        ckpt.save_model(tmp_path / chars.encode().hex() / ckpt.MODEL_FILE, model, Vocab.from_text(chars), {})
        assert said in _what_differs(tmp_path / chars.encode().hex(), model.config)


def test_tokens_per_second_leave_the_validation_s_time_out(tmp_path, clock):
    clock.step_s, clock.val_s = 0.01, 2.0  # a validation far longer than the steps around it
    corpus = load_corpus([write(tmp_path, PATTERN * 200)])
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=120, eval_steps=60), tmp_path / "run", events.append)
    rates = [e.tokens_per_s for e in events if isinstance(e, Step)]
    assert [e.step for e in events if isinstance(e, Eval)] == [60, 120] and len(rates) > 2
    # (it read ~0.2x after a validation: 2 s more in a 0.5 s window)
    assert rates == pytest.approx([TRAIN.batch_size * MODEL.block_size / clock.step_s] * len(rates))


def test_a_notebook_s_interrupt_saves_the_run_and_returns(tmp_path):
    import os
    import signal

    corpus = load_corpus([write(tmp_path, PATTERN * 20)])

    def interrupt_at_step_6(event):
        if isinstance(event, Eval) and event.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # (what a notebook's interrupt button sends)
    cfg = replace(TRAIN, eval_steps=3)
    with pytest.raises(KeyboardInterrupt, match="stopped at step 6 and saved"):  # (so a loop of runs stops too)
        train(corpus, MODEL, cfg, tmp_path / "run", interrupt_at_step_6)  # no should_stop: Ctrl-C's own
    assert ckpt.load_checkpoint(tmp_path / "run" / ckpt.MODEL_FILE).summary["step"] == 6
    assert train(corpus, MODEL, cfg, tmp_path / "run", resume=True).step == cfg.max_steps  # it goes on


def test_training_leaves_the_caller_s_random_state_as_it_was(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(corpus, MODEL, replace(TRAIN, max_steps=2), tmp_path / "run")  # (which seeds torch with cfg.seed)
    assert torch.equal(torch.rand(3), expected)


def test_a_slow_validation_raises_the_time_kept_for_the_final_one(tmp_path, clock):
    clock.step_s, clock.val_s = 0.05, 2.0  # as on a loaded host, where validation took 15x the estimate
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    cfg = replace(TRAIN, max_steps=None, time_budget=6.0, eval_interval=1.0, eval_steps=None, compile=False)
    done = train(corpus, MODEL, cfg, tmp_path / "run", started_at=0.0)
    assert done.reason == "time" and done.elapsed <= cfg.time_budget  # (it ran 7.5 s: the final one came on top)


def test_a_run_saved_before_val_step_was_recorded_resumes_knowing_where_it_validated(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    train(corpus, MODEL, replace(TRAIN, max_steps=3), tmp_path / "run")
    path = tmp_path / "run" / ckpt.STATE_FILE
    tensors, state = ckpt.load_state(path)
    del state["val_step"]  # (as an older tfcli saved it: the final validation was at its last step)
    ckpt.save_state(path, tensors, state)
    done = train(corpus, MODEL, replace(TRAIN, max_steps=10), tmp_path / "run", resume=True, should_stop=StopAfter(1))
    assert (done.step, done.val_step) == (4, 3)  # its validation is not taken for step 4's


def test_a_finished_step_run_resumed_for_more_steps_stays_at_the_floor(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    cfg = replace(TRAIN, max_steps=20, warmup_steps=1)
    train(corpus, MODEL, cfg, tmp_path / "run")
    events = []
    train(corpus, MODEL, replace(cfg, max_steps=40), tmp_path / "run", events.append, resume=True)
    steps = [e for e in events if isinstance(e, Step)]
    assert steps[0].step == 21 and all(e.lr == pytest.approx(cfg.lr * cfg.min_lr_ratio) for e in steps)  # (it read
    # the peak: 20 steps of 40 put it back before the cooldown)


def test_metrics_log_every_step_s_own_loss_the_same_in_two_runs_of_one_seed(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    logs = []
    for name in ("a", "b"):
        train(corpus, MODEL, replace(TRAIN, max_steps=12), tmp_path / name)
        records = [json.loads(line) for line in (tmp_path / name / ckpt.METRICS_FILE).read_text().splitlines()]
        logs.append([(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r])
    assert [step for step, _, _ in logs[0]] == list(range(1, 13))  # (it logged half-second means, where it fell)
    assert logs[0] == logs[1]


def test_no_clipping_when_grad_clip_is_zero(monkeypatch):
    from tfcli import trainer

    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a[1]))
    model = GPT(MODEL)
    opt = trainer.make_optimizer(model, TRAIN, torch.device("cpu"))
    x = torch.randint(MODEL.vocab_size, (2, MODEL.block_size))
    for clip in (1.0, 0.0):
        trainer.train_step(model, model, opt, x, x, torch.device("cpu"), torch.float32, clip)
    assert calls == [1.0]


def test_a_resume_drops_the_metrics_of_steps_its_checkpoint_does_not_hold(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    run = tmp_path / "run"
    train(corpus, MODEL, replace(TRAIN, max_steps=3), run)
    with open(run / "metrics.jsonl", "a") as f:  # a session that logged steps 4 and 5, then failed to save
        f.write('{"step": 4, "loss": 9.0}\n{"step": 5, "loss": 9.0}\n')
    train(corpus, MODEL, replace(TRAIN, max_steps=6), run, resume=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in records if "loss" in r)


def test_train_leaves_the_garbage_collector_as_it_found_it(tmp_path):
    import gc

    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    before = gc.get_freeze_count()
    train(corpus, MODEL, replace(TRAIN, max_steps=5), tmp_path / "run")  # (it freezes at step 3)
    assert gc.get_freeze_count() == before


def test_a_resume_with_nothing_left_to_train_says_so_and_logs_no_second_validation(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    run = tmp_path / "run"
    train(corpus, MODEL, replace(TRAIN, max_steps=4), run)
    events = []
    done = train(corpus, MODEL, replace(TRAIN, max_steps=3), run, events.append, resume=True)
    assert done.step == 4 and any("nothing to train" in getattr(e, "message", "") for e in events)
    text = (run / "metrics.jsonl").read_text()
    assert "NaN" not in text and sum('"val_loss"' in line for line in text.splitlines()) == 1


def test_train_names_a_corpus_or_configs_in_the_wrong_place(tmp_path):
    corpus = load_corpus([write(tmp_path, PATTERN * 20)])
    with pytest.raises(UsageError, match="train takes a Corpus"):
        train(str(tmp_path / "x.txt"), MODEL, TRAIN, tmp_path / "run")
    with pytest.raises(UsageError, match="a ModelConfig, then a TrainConfig"):
        train(corpus, TRAIN, MODEL, tmp_path / "run")
    for run_dir in (None, 5):  # (a TypeError from pathlib)
        with pytest.raises(UsageError, match=r"^train's run_dir must be a path \(str or Path\), got "):
            train(corpus, MODEL, TRAIN, run_dir)


def test_the_time_kept_for_the_final_validation_is_a_gpus_where_the_model_is_on_one():
    from tfcli.trainer import _final_reserve

    model = GPT(ModelConfig(vocab_size=65, n_layer=6, n_head=6, n_embd=384, block_size=256))  # (the 10.7M shape)
    val = [np.zeros(16384, dtype=np.int64)]
    on_cpu, on_gpu = _final_reserve(model, val, torch.device("cpu")), _final_reserve(model, val, torch.device("cuda"))
    assert 5 < on_cpu < 6.5 and 0.5 < on_gpu < 0.6  # (a GPU kept 5.7 s: a 15 s run there had no time for a step)


def test_validation_characters_the_training_text_lacks_are_pointed_out(tmp_path):
    (tmp_path / "v.txt").write_text("abcxyz" * 5)
    corpus = load_corpus([write(tmp_path, PATTERN * 20)], val_paths=[tmp_path / "v.txt"])
    assert corpus.val_only() == ["x", "y", "z"]  # (they joined the vocabulary in silence)
    events = []
    train(corpus, MODEL, replace(TRAIN, max_steps=1), tmp_path / "run", events.append)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert "the validation text has 3 characters the training text lacks (x y z): the model cannot learn them, and " \
           "they raise its validation loss" in notices
    assert load_corpus([write(tmp_path, PATTERN * 20)]).val_only() == []


def test_a_text_of_one_distinct_character_is_refused(tmp_path):
    corpus = load_corpus([write(tmp_path, "\n" * 500)])
    with pytest.raises(UsageError, match=r"^the text holds one distinct character \(\\n\): there is nothing"):
        train(corpus, MODEL, TRAIN, tmp_path / "run")  # (it trained to a loss of 0.000)
    assert not (tmp_path / "run").exists()
