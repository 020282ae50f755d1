import pytest
import torch

from tfcli import causal_attention


def reference(q, k, v, scale):
    T = q.size(-2)
    scores = (q @ k.mT) * scale
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def leaves(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def grads(fn, tensors, d_out):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    out.backward(d_out)
    return [out.detach()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("T, chunk", [(10, 4), (8, 4), (7, 128), (1, 4)])
def test_output_and_gradients_equal_masked_softmax_attention(monkeypatch, T, chunk):
    # blocks of queries that do not divide T, that do, a single block, and a single position
    monkeypatch.setattr(causal_attention, "CHUNK", chunk)
    tensors = leaves((2, 3, T, 5))
    d_out = torch.randn(2, 3, T, 5, generator=torch.Generator().manual_seed(1))
    scale = 0.4
    got = grads(lambda q, k, v: causal_attention.attend(q, k, v, scale), tensors, d_out)
    exact = [t.detach().double().requires_grad_() for t in tensors]  # the reference in float64
    want = grads(lambda q, k, v: reference(q, k, v, scale), exact, d_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


def test_a_key_never_receives_gradient_from_queries_before_it(monkeypatch):
    monkeypatch.setattr(causal_attention, "CHUNK", 3)
    q, k, v = leaves((1, 1, 9, 4))
    out = causal_attention.attend(q, k, v, 1.0)
    out[:, :, :5].sum().backward()  # only queries 0-4 matter
    assert (k.grad[:, :, 5:] == 0).all() and (v.grad[:, :, 5:] == 0).all()
    assert (k.grad[:, :, :5] != 0).any() and (v.grad[:, :, :5] != 0).all()


def test_under_bfloat16_autocast_it_computes_in_bfloat16_close_to_float32(monkeypatch):
    monkeypatch.setattr(causal_attention, "CHUNK", 16)
    tensors = leaves((2, 2, 40, 16))
    d_out = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", torch.bfloat16):
        out = causal_attention.attend(*tensors, 0.25)
    assert out.dtype == torch.bfloat16
    out.backward(d_out.bfloat16())
    low = [out.detach().float()] + [t.grad.clone() for t in tensors]
    want = grads(lambda q, k, v: reference(q, k, v, 0.25), tensors, d_out)
    for g, w in zip(low, want):
        torch.testing.assert_close(g, w, atol=0.05 * w.abs().max().item(), rtol=0)


def test_dropout_gradients_follow_the_probabilities_it_kept():
    tensors = leaves((2, 2, 6, 4))
    d_out = torch.randn(2, 2, 6, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    got = grads(lambda q, k, v: causal_attention.attend(q, k, v, 0.5, dropout=0.3), tensors, d_out)

    def dropped_reference(q, k, v):
        torch.manual_seed(5)  # one block (T < CHUNK): the same draws, in the same order
        keep = causal_attention._keep((2, 2, 6, 6), 0.3, q.device)
        hidden = torch.ones(6, 6, dtype=torch.bool).triu(1)
        p = ((q @ k.mT) * 0.5).masked_fill(hidden, float("-inf")).softmax(-1)
        return (p * keep / (1 - 77 / 256)) @ v  # 0.3 rounds to 77/256

    want = grads(dropped_reference, tensors, d_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    assert not torch.allclose(got[0], causal_attention.attend(*tensors, 0.5))  # dropout did drop something


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_pass_gradcheck_across_blocks(monkeypatch, dropout):
    monkeypatch.setattr(causal_attention, "CHUNK", 4)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same dropout draws at every evaluation gradcheck makes
        return causal_attention.attend(q, k, v, 0.7, dropout)

    tensors = [t.detach().double().requires_grad_() for t in leaves((1, 2, 10, 3))]
    assert torch.autograd.gradcheck(fn, tensors)


def test_without_gradients_the_output_is_the_same(monkeypatch):
    monkeypatch.setattr(causal_attention, "CHUNK", 4)
    tensors = leaves((2, 2, 10, 4))
    with_graph = causal_attention.attend(*tensors, 0.5)
    with torch.no_grad():
        without = causal_attention.attend(*tensors, 0.5)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_graph.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [0.1, 0.2, 0.5])
def test_dropout_keeps_the_share_it_should_and_scales_to_the_same_expectation(dropout):
    torch.manual_seed(0)
    keep = causal_attention._keep((8, 4, 100, 203), dropout, torch.device("cpu"))  # keys not a multiple of 8
    assert keep.shape == (8, 4, 100, 203)
    share = keep.float().mean().item()
    assert abs(share - (1 - dropout)) < 0.006  # rounded to 1/256, and sampling noise ~0.001
    assert abs(keep[..., -3:].float().mean().item() - share) < 0.02  # the last, partial word draws alike
    ones = torch.ones(keep.shape)
    assert causal_attention._drop(ones, keep, dropout).mean().item() == pytest.approx(1.0, abs=0.006)


def test_residual_dropout_passes_gradients_only_where_it_kept():
    x = torch.ones(4, 32, 64, requires_grad=True)
    torch.manual_seed(1)
    y = causal_attention.dropout(x, 0.25)
    y.sum().backward()
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    torch.testing.assert_close(x.grad, kept.float() / (1 - 64 / 256))  # 0.25 is 64/256 exactly
    assert causal_attention.dropout(x, 0.0) is x


def test_it_pays_in_bfloat16_with_dropout_and_compiled_but_not_in_eager_float32(monkeypatch):
    q32, q16 = torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    assert not causal_attention.pays(q32, 0.0)
    assert causal_attention.pays(q32, 0.1) and causal_attention.pays(q16, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert causal_attention.pays(q32, 0.0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert causal_attention.pays(q32, 0.0)
