import numpy as np
import pytest
import torch
from conftest import make_model

from tfcli.corpus import Vocab
from tfcli.errors import UsageError, command_line
from tfcli.inspect import (
    LOCAL_WINDOW,
    aggregate,
    attention,
    generation_attention,
    logit_lens,
    probe_attention,
    probe_ids,
    score_heads,
)

VOCAB = Vocab.from_text("To be, or not to be")


@pytest.fixture
def model():
    return make_model(VOCAB, n_layer=2, n_head=4, block_size=8)


def test_weights_are_layer_head_query_key_and_match_the_model(model):
    got = attention(model, "To be")
    assert got.weights.shape == (2, 4, 5, 5)
    assert got.text == "To be" and got.offset == 0
    logits, weights = model.attention(torch.as_tensor(VOCAB.encode("To be").astype(np.int64))[None])
    np.testing.assert_array_equal(got.weights, weights[0].numpy())
    np.testing.assert_array_equal(got.logits, logits[0].numpy())
    assert got.logits.shape == (5, len(VOCAB))


def test_rows_sum_to_one_over_the_past(model):
    w = attention(model, "or not").weights
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    rows, cols = np.triu_indices(6, 1)
    assert (w[..., rows, cols] == 0).all()


def test_long_prompt_is_cut_to_the_last_block_size_characters(model):
    text = "To be, or not to be"
    got = attention(model, text)
    assert got.text == text[-8:] and got.offset == len(text) - 8
    assert got.weights.shape == (2, 4, 8, 8)
    np.testing.assert_array_equal(got.weights, attention(model, text[-8:]).weights)


def test_prompt_as_long_as_the_context_is_shown_whole(model):
    text = "or not t"  # block_size 8
    got = attention(model, text)
    assert got.text == text and got.offset == 0 and got.weights.shape == (2, 4, 8, 8)


def test_empty_prompt_is_a_usage_error(model):
    with pytest.raises(UsageError, match="prompt is empty"):
        attention(model, "")


def test_prompt_with_unknown_character_names_it(model):
    with pytest.raises(UsageError, match="no z"):
        attention(model, "To bez")


# -- head patterns on hand-made attention ---------------------------------------------------

HALF = 8
REPEAT = np.concatenate([np.arange(HALF), np.arange(HALF)])  # a random-like string, then the same again


def pattern(key_of, ids=REPEAT) -> np.ndarray:
    """A (1, 1, T, T) attention array: query q puts all weight on key_of(q), or spreads evenly if None."""
    T = len(ids)
    w = np.zeros((T, T))
    for q in range(T):
        k = key_of(q)
        if k is None:
            w[q, :q + 1] = 1 / (q + 1)
        else:
            w[q, k] = 1.0
    return w[None, None]


def label(weights, ids=REPEAT) -> str:
    [head] = score_heads(weights, ids)
    return head.label


def test_previous_char_head_is_labelled_previous():
    assert label(pattern(lambda q: max(q - 1, 0))) == "previous"


def test_current_char_head_is_labelled_current():
    assert label(pattern(lambda q: q)) == "current"


def test_attention_sink_head_is_labelled_first():
    assert label(pattern(lambda q: 0)) == "first"


def test_head_on_earlier_copies_of_the_same_char_is_labelled_duplicate():
    assert label(pattern(lambda q: q - HALF if q >= HALF else None)) == "duplicate"


def test_head_on_the_char_after_an_earlier_copy_is_labelled_induction():
    got = score_heads(pattern(lambda q: q - HALF + 1 if q >= HALF else None), REPEAT)[0]
    assert got.label == "induction"
    assert got.scores["induction"] == pytest.approx(1.0)
    assert got.scores["duplicate"] == pytest.approx(0.0)


def test_evenly_spread_head_is_labelled_diffuse():
    got = score_heads(pattern(lambda q: None), REPEAT)[0]
    assert got.label == "diffuse" and got.entropy == pytest.approx(1.0)


def test_head_on_the_last_few_chars_is_labelled_local():
    T = len(REPEAT)
    w = np.tril(np.ones((T, T))) * np.triu(np.ones((T, T)), -(LOCAL_WINDOW - 1))
    assert label((w / w.sum(-1, keepdims=True))[None, None]) == "local"


def test_head_matching_nothing_well_is_labelled_mixed():
    w = 0.3 * pattern(lambda q: 0) + 0.7 * pattern(lambda q: q // 2)  # a sink plus the middle of the past
    got = score_heads(w, REPEAT)[0]
    assert got.label == "mixed", got.scores


def test_a_one_character_prompt_is_too_short_to_label():
    got = score_heads(np.ones((1, 2, 1, 1)), np.array([7]))
    assert [h.label for h in got] == ["too short", "too short"]


def test_scores_keep_layer_and_head_numbers_and_skip_undefined_patterns():
    w = np.concatenate([pattern(lambda q: 0), pattern(lambda q: q)], axis=1)  # (1, 2, T, T)
    got = score_heads(w, np.arange(4 * HALF)[:2 * HALF] % 100, layers=[3])
    assert [(h.layer, h.head, h.label) for h in got] == [(3, 0, "first"), (3, 1, "current")]
    assert np.isnan(got[0].scores["duplicate"])  # no character repeats: duplicate is never defined


def test_scores_from_a_first_query_take_only_those_rows_and_keep_their_keys_whole():
    # a sink head on the first half, a previous-character head after it: scored from HALF on, it
    # is a previous head, and position 0 is still the "first" key (cutting keys at HALF made the
    # sink look like attention to position HALF)
    w = pattern(lambda q: 0 if q < HALF else q - 1)
    whole, late = score_heads(w, REPEAT)[0], score_heads(w, REPEAT, first_query=HALF)[0]
    assert whole.scores["first"] == pytest.approx((HALF - 1) / (2 * HALF - 1))
    assert late.label == "previous" and late.scores["previous"] == pytest.approx(1.0)
    assert late.scores["first"] == pytest.approx(0.0) and late.entropy == pytest.approx(0.0)
    assert np.isnan(score_heads(w, REPEAT, first_query=2 * HALF)[0].entropy)  # no rows left


def test_scores_refuse_weights_that_do_not_match_the_ids():
    with pytest.raises(ValueError):
        score_heads(np.zeros((1, 1, 4, 4)), np.arange(5))


def test_probe_is_a_random_string_repeated_twice_within_the_context():
    ids = probe_ids(vocab_size=65, block_size=32)
    assert len(ids) == 30 and (ids[:15] == ids[15:]).all()
    assert len(set(ids[:15].tolist())) == 15


def test_probe_attention_covers_every_head(model):
    ids, w = probe_attention(model)
    assert w.shape == (2, 4, len(ids), len(ids))


# -- logit lens and generation ----------------------------------------------------------------

def test_logit_lens_last_stage_is_the_models_prediction(model):
    lens = logit_lens(model, "To be", at=3, k=3)
    assert lens.stages == ["embed", "L0", "L1"]
    assert lens.actual == "e" and len(lens.actual_p) == 3
    probs = torch.as_tensor(attention(model, "To be").logits[3]).softmax(-1)
    assert lens.top[-1][0][0] == VOCAB.chars[int(probs.argmax())]
    assert lens.top[-1][0][1] == pytest.approx(float(probs.max()), abs=1e-5)


def test_logit_lens_at_the_last_position_has_no_actual_next_char(model):
    lens = logit_lens(model, "To be", at=4)
    assert lens.actual is None and lens.actual_p == []


def test_own_text_is_what_the_model_samples_after_its_opening_and_fits_the_context(model):
    from tfcli.config import SampleConfig
    from tfcli.inspect import opening, own_text
    from tfcli.sampling import generate

    start = opening(VOCAB)
    assert start == " "  # (no line break in its vocabulary)
    assert opening(Vocab.from_text("a b\nc")) == "\n" and opening(Vocab.from_text("xy")) == "x"
    text = own_text(model, seed=5)
    assert len(text) == model.config.block_size  # (OWN_TEXT is more than this model's 8)
    sampled = "".join(p[0] for p in generate(model, VOCAB, start, SampleConfig(7, temperature=0.8, seed=5)))
    assert text == start + sampled and own_text(model, seed=5) == text


def test_generated_text_matches_sampling_and_each_step_is_the_producing_query(model):
    from tfcli.config import SampleConfig
    from tfcli.sampling import generate

    gen = generation_attention(model, "To", 10, seed=3)
    sampled = "".join(p[0] for p in generate(model, VOCAB, "To", SampleConfig(10, temperature=0.8, seed=3)))
    assert gen.text == "To" + sampled and gen.start == 2 and len(gen.steps) == 10
    for step in gen.steps:
        assert step.keys_from == max(0, step.index - 8)  # the context window of block_size 8
        assert step.weights.shape == (2, 4, step.index - step.keys_from)
        np.testing.assert_allclose(step.weights.sum(-1), 1.0, atol=1e-5)
    for step in gen.steps:  # each the last query of its own window: within the context, rows of one forward
        window = attention(model, gen.text[step.keys_from:step.index])
        np.testing.assert_allclose(step.weights, window.weights[:, :, -1], atol=1e-6)
        probs = np.exp(window.logits[-1] - window.logits[-1].max())
        assert step.p == pytest.approx(probs[VOCAB.chars.index(step.char)] / probs.sum(), abs=1e-6)
    assert gen.steps[0].keys_from == 0 and gen.steps[-1].keys_from > 0  # both kinds of window


def test_aggregate_mean_and_max_over_heads():
    w = np.array([[0.2, 0.8], [0.6, 0.4]])
    np.testing.assert_allclose(aggregate(w, "mean", 0), [0.4, 0.6])
    np.testing.assert_allclose(aggregate(w, "max", 0), [0.6, 0.8])
    with pytest.raises(UsageError, match="^how must be mean or max, got 'sum'"):
        aggregate(w, "sum", 0)
    with command_line(), pytest.raises(UsageError, match="^--aggregate must be mean or max"):
        aggregate(w, "sum", 0)


def test_attention_says_what_it_takes_when_given_ids_or_a_model_without_a_vocabulary():
    model = make_model(Vocab.from_text("anna bob"))
    with pytest.raises(UsageError, match="takes the text itself"):
        attention(model, model.vocab.encode("anna"))
    del model.vocab
    with pytest.raises(UsageError, match="no vocabulary"):
        attention(model, "anna")
    with pytest.raises(UsageError, match=r"^attention takes a model: model = tfcli.load\('runs/x'\) first"):
        attention("runs/x", "anna")  # (it said the model had no vocabulary)


def test_logit_lens_reads_a_long_text_through_the_window_the_query_sees(model):
    text = "To be, or not to be"  # 19 characters, the model's context 8
    lens = logit_lens(model, text, at=12)
    window = logit_lens(model, text[5:14], at=7)  # (the 8 characters up to position 12, and the next)
    assert lens.top == window.top and lens.actual == window.actual == " " and lens.actual_p == window.actual_p
    assert logit_lens(model, text, at=np.int64(12)).top == lens.top  # (a numpy index is a position too)
    for at in (-1, 19, 2.0, True):
        with pytest.raises(UsageError, match=r"^at=.* is not a position in the text \(0 to 18\)$"):
            logit_lens(model, text, at=at)
    with pytest.raises(UsageError, match="vocabulary has no z"):
        logit_lens(model, "To bz", at=1)  # (the next character is checked too)


def test_attention_spells_a_text_as_generate_takes_a_prompt(model):
    windows = Vocab.from_text("ab\nc")
    m = make_model(windows, block_size=8)
    got = attention(m, "ab\r\nc")  # (a Windows line end: generate reads it as \n; this refused its \r)
    assert got.text == "ab\nc" and got.weights.shape[-1] == 4
    with pytest.raises(UsageError, match='vocabulary has no z.*unknown="skip"'):
        attention(m, "abz")
    assert attention(m, "abz", unknown="skip").text == "ab"
    with pytest.raises(UsageError, match="nothing is left of the text"):
        attention(m, "zz", unknown="skip")
    assert logit_lens(m, "ab\r\nc", at=2).actual == "c"  # (positions as in got.text)


def test_generation_attention_reads_back_a_prompt_as_generate_spelt_it():
    m = make_model(Vocab.from_text("ab\nc"), block_size=8)
    gen = generation_attention(m, "ab\r\n", 3, seed=1)
    assert gen.text.startswith("ab\n") and gen.start == 3 and len(gen.steps) == 3


def test_a_label_follows_the_rule_on_the_figures_as_the_summary_prints_them():
    """An entropy of 0.797, printed 0.80, was labelled local beside "diffuse if entropy ≥ 0.80"."""
    from tfcli.inspect import DIFFUSE_ENTROPY, THRESHOLD, _label

    local = {"local": THRESHOLD + 0.1, "previous": 0.1}
    assert _label(local, DIFFUSE_ENTROPY - 0.003, THRESHOLD) == "diffuse"  # (shown as DIFFUSE_ENTROPY)
    assert _label(local, DIFFUSE_ENTROPY - 0.006, THRESHOLD) == "local"  # (shown 0.01 below it)
    assert _label({"local": 0.0, "previous": THRESHOLD - 0.004}, 0.1, THRESHOLD) == "previous"
    assert _label({"previous": 0.449, "first": 0.451}, 0.1, THRESHOLD) == "first"  # (the higher, though both 0.45)
