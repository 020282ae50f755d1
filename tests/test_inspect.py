import numpy as np
import pytest
import torch
from conftest import make_model

from tfcli.corpus import Vocab
from tfcli.errors import UsageError
from tfcli.inspect import attention

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


def test_empty_prompt_is_a_usage_error(model):
    with pytest.raises(UsageError, match="prompt is empty"):
        attention(model, "")


def test_prompt_with_unknown_character_names_it(model):
    with pytest.raises(UsageError, match="no z"):
        attention(model, "To bez")
