import math

import pytest
import torch
from conftest import make_model, windowed_forward

import tfcli.model as model_module
from tfcli import causal_attention
from tfcli.config import ModelConfig
from tfcli.corpus import Vocab
from tfcli.model import GPT, rms_norm, rope_angles

VOCAB = Vocab.from_text("abcdefghij")


@pytest.fixture(params=["c-kernel", "pytorch"])
def decode_path(request, monkeypatch):
    """Decode steps through the C kernel of tfcli.decode_attention, and through PyTorch's fallback."""
    import tfcli.decode_attention as decode_attention
    if request.param == "pytorch":
        monkeypatch.setattr(decode_attention, "kernel", lambda: None)
        yield request.param
        return
    built = decode_attention.kernel()
    if built is None:
        pytest.skip("the C kernel cannot be built here")
    steps, calls = [], []  # every layer of every decode step must have gone through the kernel
    decode = GPT.decode
    monkeypatch.setattr(GPT, "decode", lambda self, *a: steps.append(self.config.n_layer) or decode(self, *a))
    monkeypatch.setattr(decode_attention, "kernel", lambda: lambda *args: calls.append(1) or built(*args))
    yield request.param
    assert len(calls) == sum(steps), "decode steps did not go through the C kernel"


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, len(VOCAB), (B, T), generator=torch.Generator().manual_seed(seed))


def test_new_model_predicts_the_uniform_distribution():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(VOCAB), n_layer=2, n_head=2, n_embd=32, block_size=16))
    ids = random_ids(3, 16)
    logits, loss = model(ids, ids)
    assert torch.equal(logits, torch.zeros_like(logits))
    assert loss.item() == pytest.approx(math.log(len(VOCAB)), abs=1e-6)


def test_logits_have_batch_time_vocab_shape_and_loss_is_a_scalar():
    model = make_model(VOCAB)
    logits, loss = model(random_ids(3, 7), random_ids(3, 7, seed=2))
    assert logits.shape == (3, 7, len(VOCAB)) and logits.dtype == torch.float32
    assert loss.shape == () and torch.isfinite(loss)


@torch.no_grad()
def test_changing_a_future_character_leaves_earlier_logits_unchanged():
    model = make_model(VOCAB)
    ids = random_ids(1, 16)
    changed = ids.clone()
    changed[0, 10] = (ids[0, 10] + 1) % len(VOCAB)
    before, _ = model(ids)
    after, _ = model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@torch.no_grad()
def test_explicit_attention_path_matches_the_fused_one(monkeypatch):
    model = make_model(VOCAB, n_head=4)
    ids = random_ids(2, 16)
    monkeypatch.setattr(causal_attention, "MAX_T", 0)  # the fused kernel, as on GPUs and long contexts
    fused, _ = model(ids)
    explicit, weights = model.attention(ids)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=0)
    assert weights.shape == (2, 2, 4, 16, 16)  # (B, layer, head, query, key)


def test_cpu_training_path_gives_the_fused_paths_loss_and_gradients(monkeypatch):
    model = make_model(VOCAB, n_head=4)
    for p in model.parameters():  # zero-init projections would hide attention from the gradients
        torch.nn.init.normal_(p, std=0.3)
    ids, targets = random_ids(3, 16), random_ids(3, 16, seed=2)
    results = []
    for limit in (0, 256):  # 0: the fused kernel, as on GPUs and long contexts
        monkeypatch.setattr(causal_attention, "MAX_T", limit)
        monkeypatch.setattr(causal_attention, "pays", lambda q, dropout: True)  # (as in bf16, or compiled)
        model.zero_grad()
        _, loss = model(ids, targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (fused_loss, fused_grads), (loss, grads) = results
    torch.testing.assert_close(loss, fused_loss, atol=1e-6, rtol=0)
    for g, fg in zip(grads, fused_grads):
        torch.testing.assert_close(g, fg, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dropout, dtype, hand_written", [(0.0, None, False), (0.1, None, True),
                                                          (0.0, torch.bfloat16, True)])
def test_cpu_training_attention_goes_where_it_is_fastest(monkeypatch, dropout, dtype, hand_written):
    """Eager float32 without dropout: the fused kernel (faster there); bf16 or dropout: the hand-written one."""
    model = GPT(ModelConfig(vocab_size=len(VOCAB), n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=dropout))
    calls = []
    attend = causal_attention.attend
    monkeypatch.setattr(causal_attention, "attend", lambda *a: calls.append(1) or attend(*a))
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        _, loss = model(random_ids(2, 16), random_ids(2, 16, seed=2))
    loss.backward()
    assert len(calls) == (2 if hand_written else 0)  # (a call a layer)


@torch.no_grad()
def test_attention_rows_sum_to_one_with_nothing_above_the_diagonal():
    model = make_model(VOCAB)
    _, weights = model.attention(random_ids(2, 12))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6, rtol=0)
    above = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert (weights[..., above] == 0).all()
    assert (weights[..., ~above] > 0).all()
    assert (weights[..., 0, 0] == 1).all()  # the first character can only look at itself


@torch.no_grad()
def test_last_hidden_state_gives_the_forward_logits():
    model = make_model(VOCAB)
    ids = random_ids(1, 9)
    states = model.hidden_states(ids)
    assert len(states) == model.config.n_layer + 1
    torch.testing.assert_close(model.logits_from_hidden(states[-1]), model(ids)[0], atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 5, 16])
def test_kv_cache_prefill_and_decode_match_the_uncached_forward(prompt_len, decode_path):
    model = make_model(VOCAB, block_size=16)
    ids = random_ids(3, 16)
    full, _ = model(ids)
    caches = model.new_cache(3)
    torch.testing.assert_close(model.prefill(ids[:, :prompt_len], caches), full[:, prompt_len - 1], atol=1e-5, rtol=0)
    for pos in range(prompt_len, 16):
        logits = model.decode(ids[:, pos], pos, caches)
        torch.testing.assert_close(logits, full[:, pos], atol=1e-5, rtol=0)


@torch.no_grad()
def test_one_layer_decode_past_the_context_sees_exactly_the_last_block_size_characters(decode_path):
    # With one layer, keys and values depend only on the character and (relatively) its position,
    # so the ring buffer holds exactly what a fresh forward over the last block_size characters computes.
    model = make_model(VOCAB, n_layer=1, block_size=8)
    ids = random_ids(2, 30)
    caches = model.new_cache(2)
    model.prefill(ids[:, :8], caches)
    for pos in range(8, 30):
        logits = model.decode(ids[:, pos], pos, caches)
        window, _ = model(ids[:, pos - 7:pos + 1])
        torch.testing.assert_close(logits, window[:, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_multi_layer_decode_past_the_context_is_sliding_window_attention(decode_path):
    # With two or more layers it is NOT the same as re-running the last block_size characters: a deeper
    # layer's cached keys were computed when their own windows reached further back. What the ring buffer
    # computes is sliding-window attention in every layer, with no seam at the context boundary.
    model = make_model(VOCAB, n_layer=2, block_size=8)
    ids = random_ids(2, 30)
    reference = windowed_forward(model, ids)
    caches = model.new_cache(2)
    model.prefill(ids[:, :5], caches)
    for pos in range(5, 30):
        logits = model.decode(ids[:, pos], pos, caches)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, reference[:, pos], atol=1e-4, rtol=0)
    last_window, _ = model(ids[:, -8:])
    assert not torch.allclose(logits, last_window[:, -1], atol=1e-3)


@torch.no_grad()
def test_sequences_in_a_batch_do_not_affect_each_other(decode_path):
    model = make_model(VOCAB)
    ids = random_ids(2, 10)
    alone, both = model.new_cache(1), model.new_cache(2)
    model.prefill(ids[:1, :4], alone)
    model.prefill(ids[:, :4], both)
    for pos in range(4, 10):
        a = model.decode(ids[:1, pos], pos, alone)
        b = model.decode(ids[:, pos], pos, both)
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)  # kernels block differently by batch


def test_dropout_only_acts_in_training_mode():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=len(VOCAB), n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.5))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    ids = random_ids(1, 16)
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])


def test_rotate_is_apply_rope():
    from tfcli.model import apply_rope, rotary_tables, rotate
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope_angles(torch.arange(5), 8)
    full_cos, full_sin = rotary_tables(5, 8, "cpu")
    torch.testing.assert_close(rotate(x, full_cos, full_sin), apply_rope(x, cos, sin), atol=1e-6, rtol=0)


def test_a_long_generations_rotary_rows_are_exact_and_their_tables_stay_small():
    from tfcli.model import rotary_tables
    model = GPT(ModelConfig(vocab_size=5, n_layer=1, n_head=2, n_embd=16, block_size=8))
    cache = model.new_cache(1)
    for pos in (0, 7, 31, 32, 1000, 10**6, 10**6 + 40, 3):  # on, past the tables, far on, and back
        cos, sin = cache.step(pos)[:2]
        want_cos, want_sin = rotary_tables(1, 8, "cpu", start=pos)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        assert cache.cos.size(0) == 32  # four contexts, wherever the generation is (they grew with it)
    cos, sin = cache.angles(0, 8)  # a prompt after all that: positions from 0 again
    assert torch.equal(cos, rotary_tables(8, 8, "cpu")[0]) and torch.equal(sin, rotary_tables(8, 8, "cpu")[1])


def test_unit_times_root_d_is_rms_norm():
    from tfcli.model import unit
    x = torch.randn(3, 7, 16) * 5
    torch.testing.assert_close(unit(x) * 16 ** 0.5, rms_norm(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(unit(torch.zeros(2, 16)), torch.zeros(2, 16))  # no NaN from an all-zero row


@torch.no_grad()
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 0.02), (torch.bfloat16, 0.15)])
def test_half_weights_decode_close_to_float32(dtype, atol):
    model = make_model(VOCAB, std=0.3)
    ids = random_ids(2, 40)
    exact, half = model.new_cache(2, torch.float32), model.new_cache(2, dtype)
    assert half.weights[0].dtype == dtype and half.kv.dtype == torch.float32
    pairs = [(model.prefill(ids[:, :4], exact), model.prefill(ids[:, :4], half))]
    for pos in range(4, 40):  # past the context, through the ring
        pairs.append((model.decode(ids[:, pos], pos, exact), model.decode(ids[:, pos], pos, half)))
    a = torch.stack([p[0] for p in pairs]).log_softmax(-1)
    b = torch.stack([p[1] for p in pairs]).log_softmax(-1)
    assert a.float().std() > 0.5  # the distributions are far from uniform: rounding would show
    torch.testing.assert_close(b, a, atol=atol, rtol=0)
    assert not torch.equal(a, b)


@torch.no_grad()
def test_inference_weights_are_reused_until_a_parameter_changes():
    model = make_model(VOCAB)
    first = model.inference_weights(torch.float32)
    assert model.inference_weights(torch.float32) is first
    model.head.weight.add_(1.0)
    again = model.inference_weights(torch.float32)
    assert again is not first
    torch.testing.assert_close(again[2], (model.head.weight * model.config.n_embd ** 0.5))
    model.head.weight.data = model.head.weight.data * 2  # what .to() does: new storage, the same version
    moved = model.inference_weights(torch.float32)
    assert moved is not again
    torch.testing.assert_close(moved[2], (model.head.weight * model.config.n_embd ** 0.5))


def test_a_model_made_under_inference_mode_can_still_sample():
    with torch.inference_mode():
        model = make_model(VOCAB)
        cache = model.new_cache(1)
        logits = model.prefill(random_ids(1, 4), cache)
    assert torch.isfinite(logits).all()


@torch.no_grad()
def test_batched_attention_over_part_of_the_ring_is_scaled_dot_product_attention():
    from tfcli.model import attend
    ring = torch.randn(2, 3, 2, 8, 4)  # keys|values, batch 3, 2 heads, 8 slots, head_dim 4
    keys, values = ring[..., :5, :]  # the filled part of the ring, as a view
    q = torch.randn(3, 2, 1, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, scale=2.0)
    torch.testing.assert_close(attend(q, keys, values, None, 2.0), expected, atol=1e-6, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("dtype, atol, layout", [(torch.float32, 1e-4, "onednn"), (torch.bfloat16, 0.15, "onednn"),
                                                 (torch.bfloat16, 0.15, "c-kernel"), (torch.float16, 0.02, "c-kernel")])
def test_packed_weights_decode_like_plain_ones(dtype, atol, layout, monkeypatch):
    from tfcli import decode_matmul
    if layout == "onednn":
        monkeypatch.setattr(decode_matmul, "dtypes", lambda: ())
    elif dtype not in decode_matmul.dtypes():
        pytest.skip(f"decode_matmul takes no {dtype} weights here")
    if not model_module.can_pack(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    model = make_model(VOCAB, std=0.3)
    ids = random_ids(3, 40)
    plain, packed = model.new_cache(3), model.new_cache(3, dtype, pack=True)  # plain: float32, the reference
    kind = decode_matmul.Packed if layout == "c-kernel" else torch.Tensor
    assert all(isinstance(w, kind) for w in (*packed.weights[1][0], packed.weights[2]))
    assert layout == "c-kernel" or packed.weights[1][0][0].is_mkldnn
    pairs = [(model.prefill(ids[:, :4], plain), model.prefill(ids[:, :4], packed))]
    for pos in range(4, 40):  # past the context, through the ring
        pairs.append((model.decode(ids[:, pos], pos, plain), model.decode(ids[:, pos], pos, packed)))
    a = torch.stack([p[0] for p in pairs]).log_softmax(-1)
    b = torch.stack([p[1] for p in pairs]).log_softmax(-1)
    assert a.std() > 0.5  # far from uniform: a wrong layout would show
    torch.testing.assert_close(b, a, atol=atol, rtol=0)


@torch.no_grad()
def test_packed_weights_follow_parameter_changes():
    if not model_module.can_pack(torch.float32):
        pytest.skip("no oneDNN")
    model = make_model(VOCAB)
    ids = random_ids(2, 6)
    before = model.prefill(ids, model.new_cache(2, torch.float32, pack=True))
    model.head.weight.mul_(2.0)
    after = model.prefill(ids, model.new_cache(2, torch.float32, pack=True))
    torch.testing.assert_close(after, model.prefill(ids, model.new_cache(2, torch.float32)), atol=1e-4, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


def test_generate_continues_a_prompt_as_the_library_generator_does(model):
    from tfcli.config import SampleConfig
    from tfcli.sampling import generate

    steps = generate(model, model.vocab, "hello", SampleConfig(seed=5, max_new_tokens=30))
    expected = "".join(step[0] for step in steps)
    text = model.generate("hello", 30, seed=5)
    assert text == expected and len(text) == 30  # the continuation only, the prompt not repeated
    assert model.generate("hello", 30, seed=5) == text  # a seed reproduces it
    assert model.generate("hello", 30, seed=6) != text


def test_generate_gives_one_text_per_sample_and_cuts_at_a_stop_string(model):
    texts = model.generate("", 40, seed=1, num_samples=3, temperature=0)
    assert isinstance(texts, list) and len(texts) == 3 and len(set(texts)) == 1  # greedy: all the same
    full = model.generate("he", 40, temperature=0)
    cut = next(i for i in range(1, 38) if full.index(full[i:i + 2]) == i)  # (a stop string first met at i)
    assert model.generate("he", 40, temperature=0, stop=full[cut:cut + 2]) == full[:cut] != ""


def test_generate_reads_prompt_and_stop_string_in_the_spelling_the_vocabulary_knows():
    from tfcli.corpus import Vocab

    vocab = Vocab.from_text("cafe\u0301 au lait\n")  # é as e and a combining accent
    model = make_model(vocab)
    full = model.generate("cafe\u0301", 30, temperature=0)
    assert model.generate("café", 30, temperature=0) == full  # é typed as one character
    assert "e\u0301" in full  # (this model writes it: the stop string below is met)
    cut = full[:full.index("e\u0301")]
    assert model.generate("café", 30, temperature=0, stop="é") == cut == model.generate("café", 30, temperature=0,
                                                                                       stop="e\u0301")


def test_generate_applies_the_unknown_policy_to_the_prompt(model):
    from tfcli.errors import UsageError

    assert model.generate("HELLO", 10, seed=2, unknown="replace") == model.generate("hello", 10, seed=2)
    with pytest.raises(UsageError, match=r'no H E L O; remove those characters \(or pass unknown="skip" or "replace"'):
        model.generate("HELLO", 10)


def test_generate_names_a_misspelt_setting_and_a_missing_vocabulary(model):
    from tfcli.errors import UsageError

    with pytest.raises(UsageError, match="no setting tempreature; it takes .*temperature.*, unknown, vocab$"):
        model.generate("hello", 10, tempreature=0.5)
    with pytest.raises(UsageError, match="no vocabulary"):
        GPT(model.config).generate("hello", 10)
    assert len(GPT(model.config).generate("hello", 10, vocab=model.vocab, seed=1)) == 10


def test_relu_squared_and_its_gradient_are_autograds():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64).repeat(3, 1).requires_grad_()
    ours = model_module._ReluSquared.apply(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.relu(ref_x).square()
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    assert torch.equal(ours, ref) and torch.equal(x.grad, ref_x.grad)
    assert torch.autograd.gradcheck(model_module._ReluSquared.apply, (torch.randn(4, 6, dtype=torch.float64,
                                                                                    requires_grad=True),))
