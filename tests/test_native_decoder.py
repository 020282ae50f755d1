import subprocess
import sys

import numpy as np
import pytest
import torch

from tfcli import native_decoder
from tfcli.config import ModelConfig, SampleConfig
from tfcli.model import GPT, cached_step
from tfcli.sampling import generate, native_weights


def needs(dtype: str, batch: int = 1):
    if not native_decoder.runs(dtype, batch):
        pytest.skip(f"no C kernels for {dtype} here (no AVX-512, AVX512_BF16 or C compiler)")


def tiny_model(n_layer=2, n_head=3, n_embd=48, block_size=8) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(50, n_layer, n_head, n_embd, block_size)).eval()
    for p in model.parameters():  # (zero-initialised projections would hide half the step)
        torch.nn.init.normal_(p, std=0.1)
    return model


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("threaded", [True, False])
def test_a_step_in_c_is_pytorchs_layer_by_layer_step_bit_for_bit(dtype, B, threaded, monkeypatch):
    # decode_step does in one call what model.cached_step does kernel by kernel (on weights laid out
    # for the same C matmuls): so a seed samples the same text whichever path a model takes, on one
    # thread or several
    needs(dtype, B)
    monkeypatch.setattr(native_decoder, "PARALLEL_FROM", 0 if threaded else 10**18)
    model = tiny_model()
    native = native_decoder.Decoder(native_weights(model, dtype), B)
    cache = model.new_cache(B, getattr(torch, dtype), pack=True,
                            kv_dtype=torch.float32 if dtype == "float32" else torch.float16)
    for pos in range(3 * model.config.block_size):  # three times round the ring: slots are reused
        idx = torch.randint(50, (B,))
        cos, sin, slot, kv = cache.step(pos)
        expected = cached_step(idx.view(-1, 1), cos, sin, slot, None, kv, cache.weights, model.config.n_head)
        got = native.decode(idx.numpy(), pos)
        assert got.shape == (B, 50) and got.dtype == np.float32
        assert np.array_equal(got, expected.numpy()), pos
        assert np.array_equal(native.ring, cache.kv.numpy())


@torch.no_grad()
def test_within_the_context_a_step_is_the_full_forward():
    needs("float32")
    model = tiny_model()
    native = native_decoder.Decoder(native_weights(model, "float32"), 1)
    ids = torch.randint(50, (1, model.config.block_size))
    logits = native.prefill(ids[0, :3].numpy())
    full, _ = model(ids)
    torch.testing.assert_close(torch.from_numpy(logits[0]), full[0, 2], atol=1e-5, rtol=1e-5)
    for pos in range(3, model.config.block_size):
        logits = native.decode(ids[0, pos:pos + 1].numpy(), pos)
        torch.testing.assert_close(torch.from_numpy(logits[0]), full[0, pos], atol=1e-5, rtol=1e-5)


def test_prefill_fills_every_sequence_alike():
    needs("float32", 4)
    model = tiny_model()
    native = native_decoder.Decoder(native_weights(model, "float32"), 4)
    logits = native.prefill(np.array([1, 2, 3]))
    assert logits.shape == (4, 50) and (logits == logits[0]).all()
    assert (native.ring[:, :, :, :, :3] == native.ring[:, :, :1, :, :3]).all() and native.ring[..., :3, :].any()
    single = native_decoder.Decoder(native_weights(model, "float32"), 1)
    single.prefill(np.array([1, 2, 3]))
    # (four rows' products sum in another order than one row's)
    np.testing.assert_allclose(native.decode(np.full(4, 7), 3)[0], single.decode(np.array([7]), 3)[0], atol=1e-5)


def test_token_ids_outside_the_vocabulary_and_miscounted_ones_are_refused():
    needs("float32", 2)
    native = native_decoder.Decoder(native_weights(tiny_model(), "float32"), 2)
    for bad in (50, -1):
        with pytest.raises(IndexError, match="outside"):
            native.decode(np.array([0, bad]), 0)
    with pytest.raises(ValueError, match="2 token ids"):
        native.decode(np.array([0]), 0)  # one id for two sequences


def test_batches_past_many_rows_are_left_to_pytorch_but_in_float16():
    needs("float32")
    many = native_decoder.MANY_ROWS + 1
    assert not native_decoder.runs("float32", many) and not native_decoder.runs("float64", 1)
    assert native_decoder.runs("float16", many) == ("float16" in native_decoder.kinds())


def test_bfloat16_rounds_to_nearest_even_as_pytorch_does():
    w = torch.randn(64, 64) * 10
    w[0, :4] = torch.tensor([1.00390625, 1.01171875, -2.00781250, 3.0e38])  # ties either way, and near the top
    bits = native_decoder.to_dtype(w.numpy(), "bfloat16")
    assert np.array_equal(bits, w.bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(native_decoder.to_dtype(w[1:].numpy(), "float16"), w[1:].half().numpy())


def test_rotary_tables_are_the_models(monkeypatch):
    from tfcli.model import rotary_tables
    cos, sin = native_decoder.rotary_tables(7, 16, start=1000)
    theirs = rotary_tables(7, 16, "cpu", start=1000)
    torch.testing.assert_close(torch.from_numpy(cos), theirs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.from_numpy(sin), theirs[1], atol=1e-6, rtol=0)


def test_a_model_read_without_torch_samples_what_the_torch_model_samples(tmp_path, monkeypatch):
    """The C step against PyTorch's: `generate` picks the C step for a torch model too where it runs,
    so the torch legs are made to take PyTorch's step."""
    from tfcli.checkpoint import save_model
    from tfcli.corpus import Vocab
    needs("float32")
    model = tiny_model()
    vocab = Vocab.from_text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX")
    save_model(tmp_path / "model.safetensors", model, vocab, {})
    loaded = native_decoder.NativeModel.load(tmp_path)
    model.vocab = vocab
    for cfg in (SampleConfig(max_new_tokens=30, temperature=1.0, seed=5, top_k=10),
                SampleConfig(max_new_tokens=20, temperature=0.9, seed=2, num_samples=4, repeat_penalty=1.3)):
        ours = list(generate(loaded, vocab, "abc", cfg))
        with monkeypatch.context() as m:
            m.setattr(native_decoder, "runs", lambda dtype, batch: False)
            assert ours == list(generate(model, vocab, "abc", cfg))
            assert ours == list(generate(loaded.torch(), vocab, "abc", cfg))


WITHOUT_TORCH = """
import sys
from tfcli.cli import app
try:
    app(sys.argv[2:])
except SystemExit as e:
    assert not e.code, e.code
print("torch imported" if "torch" in sys.modules else "no torch", file=sys.stderr)
"""


@pytest.mark.parametrize("command, prints", [(["sample", "-p", "ab", "-n", "20", "--seed", "3"], "ab"),
                                             (["info"], "parameters"),
                                             (["inspect-attention", "-p", "abcab", "--view", "summary"], "patterns"),
                                             (["inspect-attention", "-p", "abc", "--view", "lens"], "embed"),
                                             (["inspect-attention", "-p", "ab", "--generate", "3", "--seed", "1"],
                                              "produced each character")])
def test_sample_info_and_inspect_on_a_cpu_do_not_import_torch(tmp_path, command, prints):
    # import torch was 1.5-2.5 s of a 2-3 s wait for the first character
    from tfcli.checkpoint import save_model
    from tfcli.corpus import Vocab
    needs("float32")
    model = GPT(ModelConfig(3, 1, 2, 8, 8))
    save_model(tmp_path / "model.safetensors", model, Vocab("abc"), {})
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "", *command, "-m", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[:2000]
    assert done.stderr.strip().endswith("no torch") and prints in done.stdout


def test_bfloat16_keeps_a_nan_a_nan_and_an_empty_prompt_is_refused():
    bits = native_decoder.to_dtype(np.array([[np.nan, -np.nan, 1.0]], dtype=np.float32), "bfloat16")
    assert torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()[0, :2].isnan().all()
    if native_decoder.runs("float32", 1):
        with pytest.raises(ValueError, match="a prompt of 1 to"):
            native_decoder.Decoder(native_weights(tiny_model(), "float32"), 1).prefill(np.array([], dtype=np.int64))


def test_without_torch_the_step_takes_omp_num_threads_else_the_physical_cores(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # (as in `tfcli sample`; the module object lives on in this file)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert native_decoder.threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "bogus")
    assert native_decoder.threads() == native_decoder.native.physical_cores() >= 1


def test_a_small_step_runs_on_one_thread_and_a_big_one_on_all(monkeypatch):
    """On 2 cores a second thread gained nothing at the 0.8M shape and cost 4x beside a busy process."""
    monkeypatch.setattr(native_decoder, "threads", lambda: 8)

    def step_threads(n_layer, n_embd, rows, n):
        cfg = ModelConfig(65, n_layer, 4, n_embd, 256)
        decoder = native_decoder.Decoder.__new__(native_decoder.Decoder)
        decoder.L, decoder.C, decoder.F, decoder.V = cfg.n_layer, cfg.n_embd, 4 * cfg.n_embd, cfg.vocab_size
        return decoder._threads(rows, n)
    assert step_threads(4, 128, 1, 64) == 1  # (the 0.8M shape: 0.85M multiply-adds a step)
    assert step_threads(4, 128, 16, 64) == 8  # (16 samples at once)
    assert step_threads(6, 256, 1, 128) == 8  # (4.8M)
    assert step_threads(4, 128, 1, 8192) == 8  # (a long context: attention is the work)


@torch.no_grad()
def test_the_numpy_forward_is_the_models_explicit_path():
    # inspect-attention reads a NativeModel: its logits, attention weights and residual stream
    model = tiny_model(block_size=16)
    native = native_decoder.NativeModel(model.config, None, {k: v.numpy() for k, v in model.state_dict().items()},
                                        {}, None)
    ids = torch.randint(50, (1, 13))
    logits, weights = model.attention(ids)
    got_logits, got_weights, got_states = native.forward(ids[0].numpy())
    torch.testing.assert_close(torch.from_numpy(got_logits), logits[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got_weights), weights[0], atol=2e-6, rtol=1e-5)
    for got, theirs in zip(got_states, model.hidden_states(ids), strict=True):
        torch.testing.assert_close(torch.from_numpy(got), theirs[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(native.logits_from_hidden(got_states[1])),
                               model.logits_from_hidden(model.hidden_states(ids)[1])[0], atol=2e-5, rtol=1e-5)
