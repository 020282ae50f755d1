"""The CUDA path, checked where a GPU is present.

CI machines have no GPU, so these skip there; they run in sessions lent one (see the note of
the stop that added them). Every check compares the GPU against the CPU path the rest of the
suite tests, so a CUDA-only bug shows as a difference, not as a crash someone must notice.
"""

import copy
import math
from dataclasses import replace

import pytest
import torch
from conftest import TEXT, make_model
from test_model import VOCAB, random_ids, windowed_forward

from tfcli import checkpoint as ckpt
from tfcli import cuda_graph
from tfcli.config import ModelConfig, SampleConfig, TrainConfig
from tfcli.corpus import load_corpus
from tfcli.device import pick_device, pick_dtype
from tfcli.evaluation import evaluate
from tfcli.sampling import generate
from tfcli.trainer import Start, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

PATTERN = "abcabd"
MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)


def on_cuda(model):
    gpu = copy.deepcopy(model).cuda()
    gpu.vocab = model.vocab
    return gpu


def text_of(model, prompt: str, cfg: SampleConfig) -> list[str]:
    texts = [""] * cfg.num_samples
    for piece in generate(model, model.vocab, prompt, cfg):
        texts = [t + c for t, c in zip(texts, piece)]
    return texts


def test_auto_picks_the_gpu_and_a_half_precision_it_computes_natively():
    device = pick_device("auto")
    assert device.type == "cuda"
    assert pick_dtype(device) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


@torch.no_grad()
def test_forward_and_loss_on_cuda_equal_the_cpu_ones():
    model = make_model(VOCAB)
    ids = random_ids(3, 16)
    logits, loss = model(ids, ids)
    gpu_logits, gpu_loss = on_cuda(model)(ids.cuda(), ids.cuda())
    torch.testing.assert_close(gpu_logits.cpu(), logits, atol=1e-4, rtol=0)
    assert gpu_loss.item() == pytest.approx(loss.item(), abs=1e-5)


@torch.no_grad()
def test_cached_decode_on_cuda_is_sliding_window_attention_past_the_context():
    model = make_model(VOCAB, n_layer=2, block_size=8)
    ids = random_ids(2, 30)
    reference = windowed_forward(model, ids)  # on the CPU
    gpu = on_cuda(model)
    caches = gpu.new_cache(2)
    gpu.prefill(ids[:, :5].cuda(), caches)
    for pos in range(5, 30):
        logits = gpu.decode(ids[:, pos].cuda(), pos, caches)
        torch.testing.assert_close(logits.cpu(), reference[:, pos], atol=1e-4, rtol=0)


@pytest.mark.parametrize("compile", [False, True])
@torch.no_grad()
def test_the_replayed_cuda_graph_step_is_the_eager_step_past_the_rotary_tables_and_after_a_new_prefill(compile):
    model = make_model(VOCAB, n_layer=2, block_size=8)
    ids = random_ids(3, 45)  # past 4 contexts: the rotary tables are remade, outside the graph
    reference = windowed_forward(model, ids)
    gpu = on_cuda(model)
    cache = gpu.new_cache(3)
    decode = cuda_graph.decoder(gpu, cache, compile)
    for start in (5, 1):  # a second prompt into the same cache, as the REPL does
        gpu.prefill(ids[:, :start].cuda(), cache)
        for pos in range(start, 45 if start == 5 else 12):
            logits = decode(ids[:, pos].cuda(), pos, cache)
            torch.testing.assert_close(logits.cpu(), reference[:, pos], atol=1e-4, rtol=0)


def test_greedy_text_on_cuda_equals_the_cpu_text_for_one_and_for_sixteen_samples(vocab):
    model = make_model(vocab)
    cfg = SampleConfig(max_new_tokens=3 * model.config.block_size, temperature=0.0, seed=1)
    cpu_text = text_of(model, "hel", cfg)[0]
    gpu = on_cuda(model)
    assert text_of(gpu, "hel", cfg) == [cpu_text]
    assert text_of(gpu, "hel", replace(cfg, num_samples=16)) == [cpu_text] * 16


def test_sampling_on_cuda_is_reproducible_and_stops_where_asked(vocab):
    gpu = on_cuda(make_model(vocab))
    cfg = SampleConfig(max_new_tokens=80, temperature=1.0, top_p=0.9, seed=42, num_samples=4)
    a, b = text_of(gpu, "h", cfg), text_of(gpu, "h", cfg)
    assert a == b and len(set(a)) > 1
    stop = a[0][10:12]
    cut = text_of(gpu, "h", replace(cfg, stop=(stop,)))[0]
    assert cut == a[0][:a[0].index(stop)]


@pytest.mark.parametrize("dtype, compile", [("auto", False), ("float16", False), ("auto", True)])
def test_training_on_cuda_learns_and_its_checkpoint_loads_on_the_cpu(tmp_path, dtype, compile):
    path = tmp_path / "t.txt"
    path.write_text(PATTERN * 200)
    corpus = load_corpus([path])
    events = []
    cfg = TrainConfig(max_steps=100, batch_size=16, lr=3e-3, warmup_steps=10, device="cuda", dtype=dtype,
                      compile=compile, eval_interval=1e9, sample_chars=20, seed=3)
    done = train(corpus, MODEL, cfg, tmp_path / "run", events.append)
    assert isinstance(events[0], Start) and events[0].device.startswith("cuda") and events[0].compiled == compile
    entropy = -sum(PATTERN.count(c) / 6 * math.log(PATTERN.count(c) / 6) for c in set(PATTERN))
    assert done.step == 100 and done.val_loss < 0.2 * entropy
    cpu = ckpt.load_model(tmp_path / "run", "cpu")
    assert evaluate(cpu, corpus.train).loss < 0.2 * entropy
    text = text_of(cpu, "abcab", SampleConfig(max_new_tokens=13, temperature=0.0, seed=1))[0]
    assert text == "dabcabdabcabd"


def test_resumed_run_on_cuda_takes_the_steps_an_uninterrupted_one_takes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT * 5)
    corpus = load_corpus([path])
    cfg = TrainConfig(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=5, device="cuda", dtype="float32",
                      compile=False, eval_interval=1e9, sample_chars=0, seed=3)
    whole = train(corpus, MODEL, cfg, tmp_path / "whole")
    polls = iter(range(100))
    assert train(corpus, MODEL, cfg, tmp_path / "part", should_stop=lambda: next(polls) >= 18).step == 19
    resumed = train(corpus, MODEL, cfg, tmp_path / "part", resume=True)
    a = ckpt.load_checkpoint(tmp_path / "whole" / ckpt.MODEL_FILE).state_dict
    b = ckpt.load_checkpoint(tmp_path / "part" / ckpt.MODEL_FILE).state_dict
    assert resumed.step == whole.step == 40
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
