import ctypes

import pytest
import torch
from conftest import make_model

import tfcli.decode_attention as decode_attention
from tfcli import native
from tfcli.corpus import Vocab
from tfcli.model import attention, rotary_tables

VOCAB = Vocab.from_text("abcdefghij")


@pytest.fixture
def kernel():
    built = decode_attention.kernel()
    if built is None:
        pytest.skip("the C kernel cannot be built here (no C compiler?)")
    return built


def pytorch_step(qkv, cos, sin, ring, slot):
    """What the kernel replaces: PyTorch's path of the cached step, on a copy of the ring."""
    _, B, H, n, D = ring.shape
    ring = ring.clone()
    y = attention(qkv.view(B, 1, 3, H, D).permute(2, 0, 3, 1, 4), cos, sin, torch.tensor([slot]), None, ring)
    return y.transpose(1, 2).reshape(B, H * D), ring


@torch.no_grad()
@pytest.mark.parametrize("B, H, D, T, n, slot", [
    (1, 1, 8, 4, 1, 0), (3, 2, 24, 8, 5, 4), (16, 6, 64, 32, 32, 17), (2, 4, 40, 16, 16, 0),
    (2, 3, 2, 4, 3, 2), (1, 2, 6, 8, 8, 7), (2, 1, 12, 8, 6, 5),  # head sizes below and between vector widths
    (2, 1, 6, 600, 600, 599), (1, 2, 16, 300, 257, 100),  # past one block of 256 scores: the online softmax
    (2, 2, 128, 300, 300, 299), (1, 3, 48, 40, 40, 10)])  # whole vectors of a head in registers: 8, 3 (AVX-512)
def test_a_step_is_pytorchs_path_in_float32(kernel, B, H, D, T, n, slot):
    torch.manual_seed(B * D + n)
    qkv = torch.randn(B, 3 * H * D)
    cos, sin = (t[n + 3:n + 4] for t in rotary_tables(n + 8, D, "cpu"))
    whole = torch.randn(2, B, H, T, D)
    expected, expected_ring = pytorch_step(qkv, cos, sin, whole[..., :n, :], slot)
    got = kernel(qkv, cos, sin, whole[..., :n, :], torch.tensor([slot]), D ** 0.5)
    torch.testing.assert_close(got, expected, atol=5e-6, rtol=1e-5)
    torch.testing.assert_close(whole[..., :n, :], expected_ring, atol=1e-6, rtol=0)  # the new key and value stored


@torch.no_grad()
def test_a_float16_ring_stores_rounded_keys_and_attends_close_to_float32(kernel):
    torch.manual_seed(0)
    B, H, D, T = 4, 2, 32, 16
    qkv, ring = torch.randn(B, 3 * H * D), torch.randn(2, B, H, T, D)
    cos, sin = (t[20:21] for t in rotary_tables(64, D, "cpu"))
    half = ring.half()
    expected, expected_ring = pytorch_step(qkv, cos, sin, half.float(), 9)
    got = kernel(qkv, cos, sin, half, torch.tensor([9]), D ** 0.5)
    assert torch.equal(half, expected_ring.half())
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)
    assert not torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("flags", [["-O3", "-march=native"], ["-O3", "-mavx2", "-mf16c", "-mfma"], ["-O3"]],
                         ids=["f16c-or-avx512", "avx2", "portable-c"])
@pytest.mark.parametrize("D, T", [(24, 8), (64, 40)])
def test_builds_without_the_compilers_float16_type_store_and_attend_the_same(kernel, tmp_path, flags, D, T):
    # compilers older than GCC 12 / clang 15 have no _Float16: F16C's conversions, or bit-exact software ones
    if "-mavx2" in flags and not {"avx2", "f16c", "fma"} <= set(native.cpu_flags().split()):
        pytest.skip("this CPU has no AVX2, F16C and FMA")
    other_path = tmp_path / "other.so"
    assert native.build(native.compiler(), [*flags, "-DTFCLI_NO_FLOAT16"], decode_attention.SOURCE, other_path)
    other = decode_attention.Kernel(ctypes.CDLL(str(other_path)))
    torch.manual_seed(1)
    B, H = 3, 2
    qkv = torch.randn(B, 3 * H * D) * torch.logspace(-6, 5, B * 3 * H * D).view(B, -1)  # tiny to past float16's range
    cos, sin = (t[5:6] for t in rotary_tables(64, D, "cpu"))
    ring = torch.randn(2, B, H, T, D).half()
    ours, theirs = ring.clone(), ring.clone()
    a = kernel(qkv, cos, sin, ours, torch.tensor([3]), D ** 0.5)
    b = other(qkv, cos, sin, theirs, torch.tensor([3]), D ** 0.5)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert not torch.equal(ours.view(torch.int16), ring.view(torch.int16))
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, equal_nan=True)


@torch.no_grad()
def test_pytorchs_path_reads_a_float16_ring_too(monkeypatch):
    model = make_model(VOCAB, std=0.3)
    ids = torch.randint(0, len(VOCAB), (2, 20), generator=torch.Generator().manual_seed(4))
    exact, half = model.new_cache(2), model.new_cache(2, kv_dtype=torch.float16)
    monkeypatch.setattr(decode_attention, "kernel", lambda: None)
    model.prefill(ids[:, :3], exact), model.prefill(ids[:, :3], half)
    for pos in range(3, 20):
        torch.testing.assert_close(model.decode(ids[:, pos], pos, half), model.decode(ids[:, pos], pos, exact),
                                   atol=0.02, rtol=0)


@torch.no_grad()
def test_half_keys_and_values_decode_close_to_float32(kernel):
    model = make_model(VOCAB, std=0.3)
    ids = torch.randint(0, len(VOCAB), (2, 40), generator=torch.Generator().manual_seed(3))
    exact, half = model.new_cache(2), model.new_cache(2, kv_dtype=torch.float16)
    assert half.kv.dtype == torch.float16
    pairs = [(model.prefill(ids[:, :4], exact), model.prefill(ids[:, :4], half))]
    for pos in range(4, 40):  # past the context, through the ring
        pairs.append((model.decode(ids[:, pos], pos, exact), model.decode(ids[:, pos], pos, half)))
    a = torch.stack([p[0] for p in pairs]).log_softmax(-1)
    b = torch.stack([p[1] for p in pairs]).log_softmax(-1)
    assert a.std() > 0.5  # far from uniform: rounding would show
    torch.testing.assert_close(b, a, atol=0.01, rtol=0)
    assert not torch.equal(a, b)
