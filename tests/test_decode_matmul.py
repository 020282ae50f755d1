import ctypes
import os
import subprocess
import sys

import pytest
import torch

import tfcli.decode_matmul as decode_matmul
from tfcli import native, native_decoder
from tfcli.model import unit


def needs(dtype):
    if dtype not in decode_matmul.dtypes():
        pytest.skip(f"this machine's build has no {dtype} kernel (no AVX-512, AVX512_BF16 or C compiler)")


def reference(x, w, add=None):
    """What the kernel computes, in float64: float16 and float32 weights times float32 x; bfloat16
    weights times x rounded to bfloat16."""
    xr = x.bfloat16() if w.dtype == torch.bfloat16 else x
    y = xr.double() @ w.double().t()
    return y if add is None else y + add.double()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 16, 17, 40])
@pytest.mark.parametrize("N, K", [(65, 256), (16, 8), (48, 38), (1, 1024), (35, 6)])
def test_a_product_is_the_rounded_operands_product(dtype, M, N, K):
    needs(dtype)
    torch.manual_seed(M * N + K)
    w, x = torch.randn(N, K).to(dtype), torch.randn(M, K)
    y = decode_matmul.Packed(w)(x)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    torch.testing.assert_close(y.double(), reference(x, w), atol=1e-5 * K ** 0.5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
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
        assert not decode_matmul.takes(w.bfloat16())  # pairs of k: an odd width goes to oneDNN
        with pytest.raises(ValueError, match="cannot take"):
            decode_matmul.Packed(w.bfloat16())
    bf, x = torch.randn(16, 32).bfloat16(), torch.randn(1, 32)
    if torch.bfloat16 in decode_matmul.dtypes():  # x is rounded to bfloat16, as oneDNN's bfloat16 matmul does
        y = decode_matmul.Packed(bf)(x).double()
        assert (y - x.double() @ bf.double().t()).abs().max() > 1e-6
        torch.testing.assert_close(y, reference(x, bf), atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 16, 20])
def test_unit_rows_are_the_models_rmsnorm_without_its_sqrt(dtype, M):
    needs(dtype)
    torch.manual_seed(M)
    w, x = torch.randn(70, 96).to(dtype), torch.randn(M, 96) * torch.logspace(-3, 3, M)[:, None]
    x[0] = 0.0  # a zero row stays zero, as unit() leaves it
    expected = reference(x, w) / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)  # x rounded as it is
    torch.testing.assert_close(decode_matmul.Packed(w)(x, unit=True).double(), expected, atol=1e-5, rtol=1e-4)
    if dtype == torch.float16:
        torch.testing.assert_close(decode_matmul.Packed(w)(x, unit=True).double(), reference(unit(x), w),
                                   atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, decode_matmul.MANY_ROWS + 2])
def test_relu2_is_the_mlps_activation_of_the_product(dtype, rows):
    needs(dtype)
    torch.manual_seed(rows)
    w, x = torch.randn(80, 64).to(dtype), torch.randn(rows, 64)
    plain, fused = decode_matmul.Packed(w)(x, unit=True), decode_matmul.Packed(w)(x, unit=True, relu2=True)
    assert (plain < 0).any() and (fused >= 0).all()
    torch.testing.assert_close(fused, torch.relu(plain).square(), atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batchs_prompt_of_many_rows_goes_through_pytorch(monkeypatch, dtype):
    needs(dtype)
    calls, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(decode_matmul.F, "linear", lambda *a: calls.append(1) or linear(*a))
    torch.manual_seed(0)
    w, add = torch.randn(48, 64).to(dtype), torch.randn(decode_matmul.MANY_ROWS + 1, 48)
    packed = decode_matmul.Packed(w)
    for rows in (decode_matmul.MANY_ROWS, decode_matmul.MANY_ROWS + 1):
        x = torch.randn(rows, 64)
        expected = reference(x, w) / x.double().norm(dim=-1, keepdim=True) + add[:rows].double()
        torch.testing.assert_close(packed(x, add[:rows], unit=True).double(), expected, atol=0.02, rtol=0.01)
    assert calls == [1]  # only past MANY_ROWS


@torch.no_grad()
def test_an_avx2_build_multiplies_float16_the_same(tmp_path):
    # laptops without AVX-512: 8-wide vectors, two per block of 16 columns
    needs(torch.float16)
    flags = native.cpu_flags().split()
    if not {"avx2", "f16c", "fma"} <= set(flags):
        pytest.skip("this CPU has no AVX2, F16C and FMA")
    path = tmp_path / "avx2.so"
    assert native.build(native.compiler(), ["-O3", "-mavx2", "-mf16c", "-mfma"], native_decoder.MATMUL_SOURCE, path)
    lib = ctypes.CDLL(str(path))
    lib.features.restype = ctypes.c_int
    lib.matmul_f16.argtypes = lib.matmul_f32.argtypes = decode_matmul.ARGS
    assert lib.features() == 1  # float16 and float32 only: bfloat16's kernel needs AVX512_BF16
    torch.manual_seed(0)
    cases = [(1, 65, 256), (2, 48, 38), (5, 16, 7), (17, 35, 64)]
    for (M, N, K), relu2, threads, dtype in zip(cases * 2, [0, 1, 0, 1] * 2, [1, 2, 2, 1] * 2,
                                                [torch.float16] * 4 + [torch.float32] * 4):
        w, x, add = torch.randn(N, K).to(dtype), torch.randn(M, K), torch.randn(M, N)
        packed = decode_matmul.Packed(w)
        y = torch.empty(M, N)
        flags = decode_matmul.UNIT | decode_matmul.RELU2 * relu2
        fn = lib.matmul_f16 if dtype == torch.float16 else lib.matmul_f32
        assert fn(x.data_ptr(), packed.data.data_ptr(), add.data_ptr(), y.data_ptr(), M, N, K, flags, threads) == 0
        product = reference(unit(x), w)
        expected = add.double() + (product.relu().square() if relu2 else product)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-4)
    # ...and its whole decode step (4 rows a pass, 8-wide vectors, F16C's conversion for the embedding)
    from tfcli.sampling import native_weights
    if native_decoder.attention_step("float16") is None:
        return
    lib.decode_step.argtypes, lib.decode_step.restype = native_decoder.STEP_ARGS, ctypes.c_int
    model = tiny_model()
    for dtype, B in (("float16", 6), ("float32", 1)):
        native_build, avx2 = (native_decoder.Decoder(native_weights(model, dtype), B) for _ in range(2))
        avx2.fn = lib.decode_step
        for pos in range(model.config.block_size + 3):
            idx = torch.randint(50, (B,)).numpy()
            torch.testing.assert_close(torch.from_numpy(avx2.decode(idx, pos)),
                                       torch.from_numpy(native_build.decode(idx, pos)),
                                       atol=2e-4, rtol=1e-3)  # (sums in another order, through every layer)


NO_AMX_CHECK = """
import torch
import tfcli.decode_matmul as dm
from tfcli.sampling import matmul_dtypes
assert not dm.amx() and "bfloat16" in matmul_dtypes(torch.device("cpu"))
torch.manual_seed(0)
for M, N, K in [(1, 65, 256), (3, 48, 38), (16, 35, 64), (17, 16, 6), (40, 1, 1024)]:
    w, x, add = torch.randn(N, K).bfloat16(), torch.randn(M, K), torch.randn(M, N)
    y = dm.Packed(w)(x, add, unit=True, relu2=True).double()
    product = (x.bfloat16().double() @ w.double().t()) / x.double().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, add.double() + product.relu().square(), atol=1e-5 * K ** 0.5, rtol=1e-4)
print("ok")
"""


def test_without_amx_the_avx512_bf16_kernel_multiplies_the_same():
    # on an AMX machine the tests above ran the tiles; TFCLI_NO_AMX=1 runs the vector kernel instead
    needs(torch.bfloat16)
    if not decode_matmul.amx():
        pytest.skip("no AMX here: the tests above ran the AVX512_BF16 kernel")
    env = {**os.environ, "TFCLI_NO_AMX": "1"}
    done = subprocess.run([sys.executable, "-c", NO_AMX_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_rows_and_additions_must_fit_the_matrix():
    dtype = next(iter(decode_matmul.dtypes()), None)
    if dtype is None:
        pytest.skip("no decode_matmul kernel here")
    packed = decode_matmul.Packed(torch.randn(8, 6).to(dtype))
    with pytest.raises(ValueError, match="do not fit"):
        packed(torch.randn(3, 4))
    with pytest.raises(ValueError, match="do not fit"):
        packed(torch.randn(3, 6), add=torch.randn(8))  # would have been read past its end


def test_float64_is_not_taken():
    with pytest.raises(ValueError, match="cannot take"):
        decode_matmul.Packed(torch.randn(4, 4, dtype=torch.float64))


def test_tfcli_no_kernel_turns_it_off(monkeypatch):
    from tfcli import native, native_decoder
    caches = (native._load, native_decoder.step_library, native_decoder.attention_step, decode_matmul.library)
    monkeypatch.setenv("TFCLI_NO_KERNEL", "1")
    for cache in caches:
        cache.cache_clear()
    try:
        assert decode_matmul.dtypes() == () and native_decoder.kinds() == ()
        assert not native_decoder.runs("float32", 1)
    finally:
        monkeypatch.undo()
        for cache in caches:
            cache.cache_clear()


def tiny_model(n_layer=2, n_head=3, n_embd=48, block_size=8):
    from tfcli.config import ModelConfig
    from tfcli.model import GPT
    torch.manual_seed(0)
    model = GPT(ModelConfig(50, n_layer, n_head, n_embd, block_size)).eval()
    for p in model.parameters():  # (zero-initialised projections would hide half the step)
        torch.nn.init.normal_(p, std=0.1)
    return model
