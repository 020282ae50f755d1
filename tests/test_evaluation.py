import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from tfcli.corpus import Vocab
from tfcli.errors import UsageError
from tfcli.evaluation import BATCH_TOKENS, EvalResult, batch_windows, evaluate
from tfcli.memory import forward_bytes

VOCAB = Vocab.from_text("abcdefg")


def ids_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(VOCAB), n).astype(np.uint16)


@torch.no_grad()
def reference_loss(model, ids: np.ndarray) -> float:
    """Consecutive non-overlapping windows of block_size inputs, the last one shorter; mean over all targets."""
    T, data = model.config.block_size, torch.as_tensor(ids.astype(np.int64))
    total, count = 0.0, 0
    for start in range(0, len(data) - 1, T):
        x = data[start:start + T][: len(data) - 1 - start]
        y = data[start + 1:start + 1 + len(x)]
        logits, _ = model(x[None])
        total += F.cross_entropy(logits[0], y, reduction="sum").item()
        count += len(y)
    assert count == len(data) - 1
    return total / count


@pytest.mark.parametrize("n", [2, 9, 17, 50, 65])
def test_every_character_but_the_first_is_predicted(n):
    assert evaluate(make_model(VOCAB, block_size=8), ids_of(n)).chars == n - 1


@pytest.mark.parametrize("n, batch_size", [(9, 32), (50, 32), (65, 2), (100, 3)])
def test_loss_is_the_mean_over_consecutive_windows(n, batch_size):
    model = make_model(VOCAB, block_size=8)
    got = evaluate(model, ids_of(n, seed=n), batch_size=batch_size)
    assert got.loss == pytest.approx(reference_loss(model, ids_of(n, seed=n)), rel=1e-6)


def test_evaluation_is_deterministic():
    model = make_model(VOCAB, block_size=8)
    assert evaluate(model, ids_of(70)) == evaluate(model, ids_of(70))


def test_tensor_array_and_list_give_the_same_result():
    model = make_model(VOCAB, block_size=8)
    ids = ids_of(30)
    assert evaluate(model, ids) == evaluate(model, torch.as_tensor(ids.astype(np.int64)))
    assert evaluate(model, ids) == evaluate(model, ids.tolist())  # (a notebook's list of ids)


def test_new_model_scores_ln_vocab_size():
    result = evaluate(make_model(VOCAB, std=None, block_size=8), ids_of(40))
    assert result.loss == pytest.approx(math.log(len(VOCAB)), abs=1e-6)
    assert result.bpc == pytest.approx(math.log2(len(VOCAB)), abs=1e-6)
    assert result.perplexity == pytest.approx(len(VOCAB), rel=1e-5)


def test_progress_reports_add_up_to_the_characters_scored():
    seen = []
    evaluate(make_model(VOCAB, block_size=8), ids_of(45), batch_size=2, on_progress=seen.append)
    assert seen == [16, 16, 8, 4]


def test_evaluation_records_no_graph_for_a_backward(monkeypatch):
    # (with one, activations stay alive: a validation took 5.8x the memory and twice the time)
    import tfcli.evaluation as evaluation

    seen = []
    inner = evaluation._summed_loss
    monkeypatch.setattr(evaluation, "_summed_loss", lambda *a: seen.append(torch.is_grad_enabled()) or inner(*a))
    evaluate(make_model(VOCAB, block_size=8), ids_of(45), batch_size=2)
    assert seen and not any(seen)


def test_training_mode_is_restored():
    model = make_model(VOCAB, block_size=8).train()
    evaluate(model, ids_of(20))
    assert model.training


def test_training_mode_is_restored_when_an_evaluation_is_interrupted():
    model = make_model(VOCAB)
    model.train()

    def interrupt(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, ids_of(500), on_progress=interrupt)
    assert model.training  # (dropout would otherwise stay off for the rest of a notebook's training)


def test_a_single_character_cannot_be_evaluated():
    with pytest.raises(UsageError, match="at least two characters"):
        evaluate(make_model(VOCAB, block_size=8), ids_of(1))


def test_a_run_directory_rather_than_a_model_is_refused_with_the_call_that_works():
    with pytest.raises(UsageError, match=r"^evaluate takes a model: model = tfcli.load\('runs/x'\) first"):
        evaluate("runs/x", [1, 2, 3])  # (it failed at `'str' object has no attribute 'config'`)
    with pytest.raises(UsageError, match=r"^evaluate takes a model \(tfcli.load\(path\)\), got a dict"):
        evaluate({}, [1, 2, 3])


def test_result_dict_has_the_derived_figures():
    assert EvalResult(10, math.log(4)).to_dict() == pytest.approx(
        {"chars": 10, "loss": math.log(4), "bpc": 2.0, "perplexity": 4.0})


def test_text_rather_than_ids_is_refused_with_the_call_that_works():
    with pytest.raises(UsageError, match=r"model.vocab.encode\(text\)"):
        evaluate(make_model(VOCAB, block_size=8), "abc")


@pytest.mark.parametrize("ids, message", [
    ([0, 1, 500], r"token ids must be in \[0, 7\)"), ([0, -1, 2], r"token ids must be in \[0, 7\)"),
    (np.zeros((2, 50), dtype=np.int64), "1-D sequence of integer token ids"),
    (np.array([0.0, 1.0, 2.0]), "1-D sequence of integer token ids"),
    (torch.tensor([0.0, 1.5, 2.0]), "integer token ids, got torch.float32"),  # (it was truncated to ids)
    ([0, 1.5, 2.0], "integer token ids, got float64"),  # (a list, too)
])
def test_ids_outside_the_vocabulary_or_of_the_wrong_shape_are_refused_in_words(ids, message):
    with pytest.raises(UsageError, match=message):
        evaluate(make_model(VOCAB), ids)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_a_batch_size_that_is_no_positive_int_is_refused(batch_size):
    with pytest.raises(UsageError, match=r"^batch_size must be a positive int"):  # (0 was range()'s ValueError)
        evaluate(make_model(VOCAB), [0, 1, 2], batch_size=batch_size)


def test_an_interrupted_evaluation_carries_the_score_of_what_it_finished():
    model = make_model(VOCAB, block_size=8)
    ids, seen = ids_of(500), []

    def interrupt_on_the_second(n):
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        evaluate(model, ids, batch_size=4, on_progress=interrupt_on_the_second)
    done = sum(seen)  # (two batches of 4 windows of 8)
    prefix = evaluate(model, ids[:done + 1], batch_size=4)
    assert stopped.value.partial.chars == prefix.chars == 64
    assert stopped.value.partial.loss == pytest.approx(prefix.loss, rel=1e-6)


def test_an_evaluation_interrupted_before_its_first_window_carries_no_score(monkeypatch):
    from tfcli import evaluation

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluation, "_summed_loss", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        evaluate(make_model(VOCAB), ids_of(500))
    assert stopped.value.partial is None


def test_the_default_batch_is_a_number_of_characters_and_a_cpus_is_held_to_half_its_free_memory(monkeypatch):
    model = make_model(VOCAB, block_size=8)
    monkeypatch.setattr("tfcli.memory.free_bytes", lambda swap=True: forward_bytes(model.config, 10))
    assert batch_windows(model.config, 4) == 4
    assert batch_windows(model.config, 1000) == 5  # (half of what is free)
    assert batch_windows(model.config, 1000, "cuda") == 1000  # (a GPU's allocator refuses by itself)
    assert batch_windows(model.config, None, "cuda") == BATCH_TOKENS // 8
    monkeypatch.setattr("tfcli.memory.free_bytes", lambda swap=True: None)  # (a system that does not say)
    assert batch_windows(model.config, None) == BATCH_TOKENS // 8
    assert batch_windows(model.config, 10**9) == 10**9


def test_a_batch_held_to_the_free_memory_gives_the_same_score(monkeypatch):
    model = make_model(VOCAB, block_size=8)
    whole = evaluate(model, ids_of(200), batch_size=1000)
    monkeypatch.setattr("tfcli.memory.free_bytes", lambda swap=True: forward_bytes(model.config, 6))
    seen = []
    held = evaluate(model, ids_of(200), batch_size=1000, on_progress=seen.append)
    assert seen[:2] == [3 * 8, 3 * 8]  # (three windows a forward)
    assert held.chars == whole.chars and held.loss == pytest.approx(whole.loss, rel=1e-6)
