import pytest
import torch

import tfcli.decode_matmul as decode_matmul


def needs(dtype):
    if dtype not in decode_matmul.dtypes():
        pytest.skip(f"this machine's build has no {dtype} kernel (no AVX-512, AVX512_BF16 or C compiler)")


def reference(x, w, add=None):
    """What the kernel computes, in float64: float16 weights times float32 x; bfloat16 weights times
    x rounded to bfloat16."""
    xr = x.bfloat16() if w.dtype == torch.bfloat16 else x
    y = xr.double() @ w.double().t()
    return y if add is None else y + add.double()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16, 17, 40])
@pytest.mark.parametrize("N, K", [(65, 256), (16, 8), (48, 38), (1, 1024), (35, 6)])
def test_a_product_is_the_rounded_operands_product(dtype, M, N, K):
    needs(dtype)
    torch.manual_seed(M * N + K)
    w, x = torch.randn(N, K).to(dtype), torch.randn(M, K)
    y = decode_matmul.Packed(w)(x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), reference(x, w), atol=1e-5 * K ** 0.5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_is_fused_and_rows_may_come_in_any_shape(dtype):
    needs(dtype)
    torch.manual_seed(0)
    w, x, add = torch.randn(40, 64).to(dtype), torch.randn(3, 7, 64), torch.randn(21, 40)
    packed = decode_matmul.Packed(w)
    y = packed(x.transpose(0, 1), add)  # not contiguous
    assert y.shape == (7, 3, 40)
    torch.testing.assert_close(y.reshape(21, 40).double(), reference(x.transpose(0, 1).reshape(21, 64), w, add),
                               atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_float16_odd_widths_and_the_kernels_own_rounding():
    needs(torch.float16)
    w, x = torch.randn(20, 7).half(), torch.randn(2, 7)
    torch.testing.assert_close(decode_matmul.Packed(w)(x).double(), reference(x, w), atol=1e-5, rtol=1e-5)
    if torch.bfloat16 in decode_matmul.dtypes():
        with pytest.raises(ValueError, match="even"):
            decode_matmul.Packed(w.bfloat16())
    bf, x = torch.randn(16, 32).bfloat16(), torch.randn(1, 32)
    if torch.bfloat16 in decode_matmul.dtypes():  # x is rounded to bfloat16, as oneDNN's bfloat16 matmul does
        y = decode_matmul.Packed(bf)(x).double()
        assert (y - x.double() @ bf.double().t()).abs().max() > 1e-6
        torch.testing.assert_close(y, reference(x, bf), atol=1e-5, rtol=1e-5)


def test_float32_is_not_taken():
    with pytest.raises(ValueError, match="cannot take"):
        decode_matmul.Packed(torch.randn(4, 4))


def test_tfcli_no_kernel_turns_it_off(monkeypatch):
    from tfcli import native
    monkeypatch.setenv("TFCLI_NO_KERNEL", "1")
    native.load.cache_clear(), decode_matmul.library.cache_clear()
    try:
        assert decode_matmul.dtypes() == ()
    finally:
        monkeypatch.undo()
        native.load.cache_clear(), decode_matmul.library.cache_clear()
