import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEXT, make_model, windowed_forward
from hypothesis import given
from hypothesis import strategies as st

from tfcli.config import SampleConfig
from tfcli.corpus import Vocab
from tfcli.errors import UsageError, command_line
from tfcli.sampling import (
    StopMatcher,
    apply_penalties,
    collect,
    filter_logits,
    generate,
    generate_pieces,
    new_rng,
    pick,
)

PROBS = [0.15, 0.5, 0.05, 0.3]  # deliberately not sorted, so the filters' sort and scatter are exercised
LOGITS = np.array([[math.log(p) for p in PROBS]], dtype=np.float32)


def kept(logits: np.ndarray) -> list[int]:
    return np.isfinite(logits[0]).nonzero()[0].tolist()


@pytest.fixture
def torch_path(monkeypatch):
    """Sampling through PyTorch's steps (as on GPUs, or batches of more rows than the C step takes)."""
    monkeypatch.setattr("tfcli.native_decoder.runs", lambda dtype, batch: False)


def text_of(model, prompt: str, cfg: SampleConfig, sample: int = 0) -> str:
    return "".join(piece[sample] for piece in generate(model, model.vocab, prompt, cfg))


@torch.no_grad()
def greedy_reference(model, prompt: str, n: int) -> str:
    ids = torch.as_tensor(model.vocab.encode(prompt).astype("int64"))[None]
    for _ in range(n):
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return model.vocab.decode(ids[0, len(prompt):])


def test_greedy_is_the_argmax_of_the_uncached_forward_at_every_step(model):
    n = model.config.block_size - len("hello") + 1  # the last pick is made at the final position of the context
    got = text_of(model, "hello", SampleConfig(max_new_tokens=n, temperature=0.0, seed=1))
    assert got == greedy_reference(model, "hello", n)
    assert len(got) == n


def test_greedy_ignores_the_seed(model):
    a = text_of(model, "he", SampleConfig(max_new_tokens=40, temperature=0.0, seed=1))
    b = text_of(model, "he", SampleConfig(max_new_tokens=40, temperature=0.0, seed=2))
    assert a == b


def test_top_k_keeps_exactly_k_where_logits_tie_the_lowest_ids_first_as_greedy_does():
    tied = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    assert [kept(row[None]) for row in filter_logits(tied, SampleConfig(top_k=2))] == [[0, 1], [1, 2]]
    assert [kept(row[None]) for row in filter_logits(tied, SampleConfig(top_k=1))] == [[0], [1]]


def test_top_k_one_is_greedy_on_an_untrained_model_whose_logits_all_tie():
    model = make_model(Vocab.from_text(TEXT), std=None)
    greedy = text_of(model, "he", SampleConfig(max_new_tokens=20, temperature=0))
    assert text_of(model, "he", SampleConfig(max_new_tokens=20, temperature=1.0, top_k=1, seed=1)) == greedy


def test_top_k_zero_is_off_in_the_library_too():
    assert np.array_equal(filter_logits(LOGITS, SampleConfig(top_k=0).validate()), LOGITS)


def test_top_k_one_is_greedy(model):
    greedy = text_of(model, "wo", SampleConfig(max_new_tokens=40, temperature=0.0, seed=1))
    top1 = text_of(model, "wo", SampleConfig(max_new_tokens=40, temperature=1.5, top_k=1, seed=7))
    assert top1 == greedy


def test_same_seed_and_settings_reproduce_the_text(model):
    cfg = SampleConfig(max_new_tokens=60, temperature=1.0, top_p=0.95, seed=42)
    assert text_of(model, "hel", cfg) == text_of(model, "hel", cfg)


def test_different_seeds_give_different_text(model):
    a = text_of(model, "hel", SampleConfig(max_new_tokens=60, temperature=1.0, seed=1))
    b = text_of(model, "hel", SampleConfig(max_new_tokens=60, temperature=1.0, seed=2))
    assert a != b


def test_num_samples_yields_that_many_different_streams(model):
    pieces = list(generate(model, model.vocab, "h", SampleConfig(max_new_tokens=30, temperature=1.0,
                                                                  num_samples=3, seed=3)))
    assert len(pieces) == 30 and all(len(p) == 3 and all(len(c) == 1 for c in p) for p in pieces)
    texts = {"".join(p[i] for p in pieces) for i in range(3)}
    assert len(texts) == 3


def test_empty_prompt_starts_from_a_newline(model):
    cfg = SampleConfig(max_new_tokens=10, temperature=0.0, seed=1)
    assert text_of(model, "", cfg) == text_of(model, "\n", cfg)


def test_long_prompt_is_cut_to_the_context(model):
    cfg = SampleConfig(max_new_tokens=10, temperature=0.0, seed=1)
    long = "hello world\nhello world\n"
    assert len(long) > model.config.block_size
    assert text_of(model, long, cfg) == text_of(model, long[-model.config.block_size:], cfg)


def test_generation_runs_past_the_context(model):
    got = text_of(model, "hello", SampleConfig(max_new_tokens=5 * model.config.block_size, temperature=1.0, seed=5))
    assert len(got) == 5 * model.config.block_size
    assert set(got) <= set(TEXT)


@pytest.mark.parametrize("n_layer, seed", [(1, 0), (3, 2)])  # (weights whose greedy text keeps changing)
@pytest.mark.parametrize("path", ["native", "pytorch"])
def test_greedy_generation_past_the_context_is_the_argmax_of_sliding_window_attention(n_layer, seed, path,
                                                                                      monkeypatch):
    import tfcli.sampling as sampling

    model = make_model(Vocab.from_text(TEXT), n_layer=n_layer, block_size=16, std=0.5, seed=seed)
    cfg = SampleConfig(max_new_tokens=60, temperature=0)
    if path == "pytorch":
        monkeypatch.setattr(sampling, "native_decodes", lambda *a: False)
    elif not sampling.native_decodes(model, 1, cfg):
        pytest.skip("tfcli's C decoder cannot run here")
    ids = [int(i) for i in model.vocab.encode("he")]
    with torch.no_grad():
        for _ in range(60):  # (no cache: every layer attends to the last 16 positions, from scratch)
            ids.append(int(windowed_forward(model, torch.tensor([ids]))[0, -1].argmax()))
    assert text_of(model, "he", cfg) == model.vocab.decode(ids[2:])
    assert len(set(ids[40:])) >= 4  # (past the context the text still varies: the windows are really compared)


def test_zero_new_tokens_yields_nothing(model):
    assert list(generate(model, model.vocab, "he", SampleConfig(max_new_tokens=0, seed=1))) == []


def test_generation_stops_before_the_stop_string(model):
    free = text_of(model, "h", SampleConfig(max_new_tokens=60, temperature=1.0, seed=11))
    stop = free[20:22]
    cut = free[:free.index(stop)]
    assert text_of(model, "h", SampleConfig(max_new_tokens=60, temperature=1.0, seed=11, stop=(stop,))) == cut


def test_a_notebook_is_warned_of_a_stop_string_the_model_cannot_write(model):
    cfg = SampleConfig(max_new_tokens=10, seed=1, stop=("\n", "✓"))
    with pytest.warns(UserWarning, match="^stop='✓' can never match: the model's vocabulary has no ✓$") as said:
        text = text_of(model, "h", cfg)  # (it was accepted, and silently never matched)
    assert {w.filename for w in said} == {__file__}  # (the first line outside tfcli)
    assert text == text_of(model, "h", replace(cfg, stop=("\n",)))  # (the other stops still work)


def test_generate_is_told_its_arguments_are_in_the_wrong_places(model):
    with pytest.raises(UsageError, match="its Vocab, the prompt and a SampleConfig, got a Vocab and a dict"):
        text_of(model, "h", {"seed": 1})  # (an AttributeError: 'dict' object has no attribute 'validate')
    with pytest.raises(UsageError, match="^the prompt must be a str, got NoneType"):
        model.generate(None, 10)
    with pytest.raises(UsageError, match="^the prompt must be a str, got bytes"):
        model.generate(b"he", 10)
    with pytest.raises(UsageError, match="^vocab must be a Vocab .*, got str"):
        model.generate("he", 10, vocab="abc")


def test_a_stop_string_is_read_in_the_vocabulary_s_spelling_by_the_library_too(model):
    free = text_of(model, "h", SampleConfig(max_new_tokens=60, temperature=1.0, seed=11))
    assert "\n" in free and "\r" not in model.vocab.chars  # (the model writes line ends, as \n)
    cut = free[:free.index("\n")]
    assert text_of(model, "h", SampleConfig(max_new_tokens=60, temperature=1.0, seed=11, stop=("\r\n",))) == cut


@pytest.mark.parametrize("bad", [{"max_new_tokens": -5}, {"num_samples": 0}, {"top_p": 5.0}])
def test_a_notebooks_settings_are_checked_as_the_clis_flags_are_and_named_as_python_spells_them(model, bad):
    with pytest.raises(UsageError, match=f"^{next(iter(bad))} must"):
        next(generate(model, model.vocab, "h", SampleConfig(seed=1, **bad)))


def test_collect_says_which_samples_a_stop_string_ended(model):
    cfg = SampleConfig(max_new_tokens=60, temperature=1.0, seed=11, num_samples=4)
    free, _ = collect(generate_pieces(model, model.vocab, "h", cfg), 4)
    stop = free[0].text[20:24]  # met by the first sample (and, with this seed, by no other)
    rows, interrupted = collect(generate_pieces(model, model.vocab, "h", replace(cfg, stop=(stop,))), 4)
    assert not interrupted and rows[0].stopped and rows[0].text == free[0].text[:free[0].text.index(stop)]
    assert not all(row.stopped for row in rows)
    for row, whole in zip(rows, (f.text for f in free)):
        assert row.stopped == (stop in whole)  # the others ran to -n, unless they met it too
        assert row.text == (whole[:whole.index(stop)] if row.stopped else whole)


def test_pick_at_zero_temperature_is_the_argmax():
    assert pick(LOGITS, 0.0, new_rng(0)).tolist() == [1]


def test_pick_never_chooses_a_removed_token():
    logits = np.array([[0.0, -np.inf, 5.0, -np.inf]] * 200, dtype=np.float32)
    assert set(pick(logits, 3.0, new_rng(0)).tolist()) == {0, 2}


@pytest.mark.parametrize("top_k, expected", [(1, [1]), (2, [1, 3]), (3, [0, 1, 3]), (4, [0, 1, 2, 3]),
                                             (10, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(filter_logits(LOGITS, SampleConfig(top_k=top_k))) == expected


@pytest.mark.parametrize("top_p, expected", [(0.0, [1]), (0.45, [1]), (0.7, [1, 3]), (0.9, [0, 1, 3]),
                                             (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(filter_logits(LOGITS, SampleConfig(top_p=top_p))) == expected


@pytest.mark.parametrize("min_p, expected", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 3]), (0.5, [1, 3]),
                                             (0.7, [1]), (1.0, [1])])
def test_min_p_keeps_tokens_at_least_min_p_times_the_best(min_p, expected):
    assert kept(filter_logits(LOGITS, SampleConfig(min_p=min_p))) == expected


def test_filters_leave_kept_logits_unchanged():
    out = filter_logits(LOGITS, SampleConfig(top_k=2))
    assert out[0, 1] == LOGITS[0, 1] and out[0, 3] == LOGITS[0, 3]


def test_penalties_follow_llama_cpp():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], dtype=np.float32)
    recent = np.array([[0, 1, 1]])
    cfg = SampleConfig(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # token 0: 2/2 - 0.5 - 0.25*1; token 1: -1*2 - 0.5 - 0.25*2; tokens 2, 3 unseen
    assert apply_penalties(logits, recent, cfg).tolist() == [[0.25, -3.0, 0.5, 3.0]]


def test_repeat_penalty_only_looks_at_the_last_n_tokens():
    logits = np.array([[2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    history = np.array([[0, 3, 3]])
    out = filter_logits(logits, SampleConfig(repeat_penalty=2.0, repeat_last_n=2), history)
    assert out.tolist() == [[2.0, 2.0, 2.0, 1.0]]


def test_no_penalties_means_history_is_ignored():
    out = filter_logits(LOGITS, SampleConfig(), np.array([[0, 1, 1]]))
    assert np.array_equal(out, LOGITS)


def test_stop_string_is_cut_exactly():
    m = StopMatcher(("STOP",))
    assert m.feed("hello wor") == "hello wor"
    assert m.feed("ld STOP here") == "ld "
    assert m.done
    assert m.feed("more") == "" and m.flush() == ""


def test_stop_string_split_across_pieces_is_never_shown():
    m = StopMatcher(("END",))
    assert [m.feed(p) for p in ("abE", "N", "Dxyz")] == ["ab", "", ""]
    assert m.done


def test_held_back_text_is_released_when_it_is_not_a_stop():
    m = StopMatcher(("END",))
    assert m.feed("abE") == "ab"
    assert m.feed("Nx") == "ENx"
    assert m.feed("abEN") == "ab"
    assert m.flush() == "EN"


def test_earliest_of_several_stop_strings_wins():
    assert StopMatcher(("yb", "cd")).feed("xcdyb") == "x"


def test_overlapping_stop_prefix_is_handled():
    m = StopMatcher(("aab",))
    assert "".join(m.feed(c) for c in "aaab") == "a"


@given(st.lists(st.text("abc", max_size=4), max_size=12), st.lists(st.text("abc", min_size=1, max_size=3),
                                                                     min_size=1, max_size=3))
def test_stop_matcher_output_is_the_text_up_to_the_first_stop(pieces, stops):
    m = StopMatcher(tuple(stops))
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    text = "".join(pieces)
    for end in range(1, len(text) + 1):  # generation is one character at a time: the first stop to complete
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            assert out == text[:end - max(map(len, done))]
            return
    assert out == text


def test_repeat_last_n_zero_turns_the_penalties_off():
    logits = np.array([[2.0, -1.0, 0.5, 3.0]], dtype=np.float32)
    history = np.array([[0, 1, 3]])
    cfg = SampleConfig(repeat_penalty=2.0, presence_penalty=1.0, repeat_last_n=0)
    assert np.array_equal(filter_logits(logits, cfg, history), logits)
    assert not np.array_equal(filter_logits(logits, SampleConfig(repeat_penalty=2.0), history), logits)


def test_repeat_last_n_minus_one_penalises_the_whole_context(model):
    cfg = SampleConfig(max_new_tokens=3 * model.config.block_size, temperature=0.0, repeat_penalty=3.0, seed=1)
    whole = text_of(model, "hel", replace(cfg, repeat_last_n=-1))
    assert whole == text_of(model, "hel", replace(cfg, repeat_last_n=model.config.block_size))
    assert whole != text_of(model, "hel", replace(cfg, repeat_penalty=1.0))  # the penalty did act
    history = np.array([[0, 3, 3]])
    out = filter_logits(np.array([[2.0, 2.0, 2.0, 2.0]], dtype=np.float32),
                        SampleConfig(repeat_penalty=2.0, repeat_last_n=-1), history)
    assert out.tolist() == [[1.0, 2.0, 2.0, 1.0]]


@pytest.mark.parametrize("changes, message", [
    (dict(presence_penalty=float("nan")), "--presence-penalty must be a number within"),
    (dict(frequency_penalty=float("inf")), "--frequency-penalty must be a number within"),
    (dict(presence_penalty=float("-inf")), "--presence-penalty must be a number within"),
    (dict(presence_penalty=1e39), "--presence-penalty must be a number within"),  # (inf as a float32)
    (dict(frequency_penalty=-1e39), "--frequency-penalty must be a number within"),
    (dict(repeat_penalty=1e300), "--repeat-penalty must be positive"),
    (dict(repeat_last_n=-2), "--repeat-last-n must be >= -1"),
    (dict(temperature=float("inf")), "--temperature must be a number from 0"),
    (dict(temperature=1e300), "--temperature must be a number from 0"),
    (dict(top_k=-1), r"--top-k must be >= 0 \(0: off\)"),
])
def test_sampling_settings_that_would_lose_every_logit_are_refused(changes, message):
    with command_line(), pytest.raises(UsageError, match=message):
        SampleConfig(**changes).validate()


@pytest.mark.slow  # compiling the decode step takes seconds
def test_compiled_decode_samples_the_same_text_as_eager_past_the_context(model, monkeypatch, torch_path):
    monkeypatch.setattr("tfcli.decode_attention.kernel", lambda: None)  # where the C kernel runs, nothing compiles
    n = 3 * model.config.block_size  # through the ring's wrap, where the mask switches to "all slots"
    for cfg in (SampleConfig(max_new_tokens=n, temperature=0.0, seed=1),
                SampleConfig(max_new_tokens=n, temperature=1.0, top_k=5, seed=3)):
        eager = text_of(model, "he", cfg)
        compiled = text_of(model, "he", SampleConfig(**{**cfg.__dict__, "compile": True}))
        assert compiled == eager


def test_decode_dtype_halves_weights_only_for_models_that_outgrow_the_cache(model, monkeypatch):
    import tfcli.native
    import tfcli.native_decoder
    import tfcli.sampling as sampling
    assert sampling.decode_dtype(model, 1) == "float32"  # a test model is tiny
    assert sampling.decode_dtype(model, 1, "bfloat16") == "bfloat16"
    monkeypatch.setattr(tfcli.native, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(tfcli.native_decoder, "runs", lambda dtype, batch: True)  # ...and its steps run in C
    assert sampling.decode_dtype(model, 2) == "float32"
    assert sampling.decode_dtype(model, 3) == "bfloat16"
    monkeypatch.setattr(tfcli.native_decoder, "runs", lambda dtype, batch: False)
    assert sampling.decode_dtype(model, 3) == "float32"
    monkeypatch.setattr(sampling, "HALF_WEIGHTS_FROM", 0)
    assert sampling.decode_dtype(model, 1) == "float16"
    monkeypatch.setattr(tfcli.native, "cpu_has_native_bf16", lambda: True)
    assert sampling.decode_dtype(model, 16) == "bfloat16"
    monkeypatch.setattr(tfcli.native, "cpu_has_native_bf16", lambda: False)
    assert sampling.decode_dtype(model, 16) == "float32"


def test_weights_are_packed_for_big_cpu_models_unless_compiling(model, monkeypatch):
    import tfcli.model
    import tfcli.sampling as sampling
    monkeypatch.setattr("tfcli.decode_attention.kernel", lambda: None)  # so that --compile compiles
    monkeypatch.setattr(tfcli.model, "can_pack", lambda dtype: True)
    packs = []
    monkeypatch.setattr(type(model), "new_cache", lambda self, batch, dtype, pack, kv_dtype: packs.append(pack))
    sampling.new_cache(model, 4, SampleConfig())  # a test model is tiny
    monkeypatch.setattr(sampling, "HALF_WEIGHTS_FROM", 0)
    sampling.new_cache(model, 4, SampleConfig())
    sampling.new_cache(model, 1, SampleConfig(compile=True))  # the compiled step takes plain weights
    sampling.new_cache(model, 4, SampleConfig(compile=True))  # batches are never compiled
    monkeypatch.setattr(tfcli.model, "can_pack", lambda dtype: False)
    sampling.new_cache(model, 4, SampleConfig())
    assert packs == [False, True, False, True, False]


def test_cpu_models_step_in_c_where_the_kernels_run(model, monkeypatch):
    # a small model's PyTorch step is per-call overhead; the native decoder's is one C call
    import tfcli.native_decoder as native_decoder
    import tfcli.sampling as sampling
    if not native_decoder.runs("float32", 1):
        pytest.skip("no C kernels here")
    for batch, dtype in ((1, "auto"), (4, "auto"), (1, "float16")):
        assert isinstance(sampling.new_decoder(model, batch, SampleConfig(dtype=dtype)), native_decoder.Decoder)
    monkeypatch.setattr(native_decoder, "runs", lambda dtype, batch: False)
    assert isinstance(sampling.new_decoder(model, 1, SampleConfig()), sampling.TorchDecoder)


@pytest.mark.parametrize("built", [True, False])
def test_keys_and_values_are_half_only_with_half_weights_and_the_c_kernel_to_read_them(model, monkeypatch, built):
    import tfcli.sampling as sampling
    monkeypatch.setattr("tfcli.decode_attention.kernel", lambda: object() if built else None)
    kinds = []
    monkeypatch.setattr(type(model), "new_cache", lambda self, batch, dtype, pack, kv_dtype: kinds.append(kv_dtype))
    sampling.new_cache(model, 1, SampleConfig())  # tiny: float32 weights
    monkeypatch.setattr(sampling, "HALF_WEIGHTS_FROM", 0)
    sampling.new_cache(model, 1, SampleConfig())  # float16 weights
    sampling.new_cache(model, 1, SampleConfig(compile=True))  # compiled (PyTorch's path) only without the kernel
    sampling.new_cache(model, 16, SampleConfig(dtype="bfloat16"))
    sampling.new_cache(model, 16, SampleConfig(dtype="float32"))
    half = torch.float16 if built else torch.float32
    assert kinds == [torch.float32, half, half, half, torch.float32]


def test_compile_applies_to_single_samples_only(model, monkeypatch, torch_path):
    monkeypatch.setattr("tfcli.decode_attention.kernel", lambda: None)
    compiled = []
    monkeypatch.setattr(type(model), "compiled_decoder", lambda self, cache: compiled.append(cache) or self.decode)
    batch = text_of(model, "he", SampleConfig(max_new_tokens=5, seed=1, num_samples=3, compile=True))
    assert compiled == [] and batch == text_of(model, "he", SampleConfig(max_new_tokens=5, seed=1, num_samples=3))
    text_of(model, "he", SampleConfig(max_new_tokens=5, seed=1, compile=True))
    assert len(compiled) == 1


def test_compile_is_not_used_where_the_c_kernel_decodes(model, monkeypatch):
    import tfcli.decode_attention
    if tfcli.decode_attention.kernel() is None:
        pytest.skip("the C kernel cannot be built here")
    compiled = []
    monkeypatch.setattr(type(model), "compiled_decoder", lambda self, cache: compiled.append(cache) or self.decode)
    cfg = SampleConfig(max_new_tokens=5, seed=1)
    assert text_of(model, "he", SampleConfig(**{**cfg.__dict__, "compile": True})) == text_of(model, "he", cfg)
    assert compiled == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_packed_weights_sample_the_same_batch_as_plain_ones(model, monkeypatch, dtype, torch_path):
    import tfcli.model
    import tfcli.sampling as sampling
    from tfcli import decode_matmul
    if not tfcli.model.can_pack(getattr(torch, dtype)):
        pytest.skip(f"neither decode_matmul nor oneDNN takes {dtype} weights here")
    cfg = SampleConfig(max_new_tokens=2 * model.config.block_size, temperature=0.0, seed=1, num_samples=3,
                       dtype="float32")
    plain = [text_of(model, "he", cfg, i) for i in range(3)]
    monkeypatch.setattr(sampling, "HALF_WEIGHTS_FROM", 0)
    cfg = SampleConfig(**{**cfg.__dict__, "dtype": dtype})
    head = sampling.new_cache(model, 3, cfg).weights[2]
    in_c = getattr(torch, dtype) in decode_matmul.dtypes()  # else in oneDNN's layout
    assert isinstance(head, decode_matmul.Packed) if in_c else head.is_mkldnn
    assert [text_of(model, "he", cfg, i) for i in range(3)] == plain


def test_float16_greedy_text_matches_float32_on_a_small_model(model):
    cfg = SampleConfig(max_new_tokens=3 * model.config.block_size, temperature=0.0, seed=1)
    exact = text_of(model, "he", cfg)
    assert text_of(model, "he", SampleConfig(**{**cfg.__dict__, "dtype": "float16"})) == exact


def test_logprobs_can_be_left_out():
    from conftest import make_model

    from tfcli.corpus import Vocab
    from tfcli.sampling import generate_pieces
    m = make_model(Vocab.from_text("abc"))
    pieces = list(generate_pieces(m, m.vocab, "a", SampleConfig(max_new_tokens=3, seed=1), logprobs=False))
    assert [p.logprobs for p in pieces] == [None] * 3
    with_lp = list(generate_pieces(m, m.vocab, "a", SampleConfig(max_new_tokens=3, seed=1)))
    assert [p.chars for p in pieces] == [p.chars for p in with_lp]
    assert all(lp[0] <= 0 for lp in (p.logprobs for p in with_lp))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_pick_draws_each_token_with_its_tempered_probability(temperature):
    n = 40_000
    draws = pick(np.repeat(LOGITS, n, axis=0), temperature, new_rng(0))
    freq = np.bincount(draws, minlength=len(PROBS)) / n
    expected = np.array(PROBS) ** (1 / temperature)
    expected /= expected.sum()
    assert np.abs(freq - expected).max() < 0.01  # 4 standard errors at n = 40,000


def test_aligned_pairs_shown_text_with_its_logprobs_and_keeps_a_long_row_whole():
    from tfcli.sampling import Aligned
    row = Aligned()
    assert row.text == "" and row.add("", "a", -1.0) == []  # held back (a possible stop string)
    assert row.add("ab", "b", -2.0) == [-1.0, -2.0]
    assert row.add("c", "c", -3.0) == [-3.0] and row.text == "abc" and row.logprobs == [-1.0, -2.0, -3.0]
    for _ in range(100_000):  # (a string grown by += was quadratic: minutes for a long --json sample)
        row.add("x", "x", 0.0)
    assert row.text == "abc" + "x" * 100_000 and len(row.logprobs) == 100_003
    stream = Aligned(keep=False)  # a stream shows each piece once: nothing to keep
    assert stream.add("ab", "b", -2.0) == [-2.0] and stream.text == "" and stream.logprobs == []


def test_a_negative_seed_samples_as_its_twos_complement(model):
    # (seeds take -2^63 and up, as PyTorch's generators do; numpy's PCG64 takes none below 0)
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, seed=-5)
    assert text_of(model, "he", cfg) == text_of(model, "he", replace(cfg, seed=2**64 - 5))


def test_a_gpu_step_that_cannot_be_recorded_runs_eagerly_and_a_prefill_only_decoder_records_none(model, monkeypatch):
    from tfcli import cuda_graph, sampling

    asked = []

    def refused(model, cache, compiled):
        asked.append(compiled)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")  # (what a capture can meet)
    monkeypatch.setattr(cuda_graph, "runs", lambda device: True)  # as if the model were on a GPU
    monkeypatch.setattr(cuda_graph, "decoder", refused)
    decoder = sampling.TorchDecoder(model, 1, SampleConfig())
    assert asked == [False] and decoder.step == model.decode
    ids = np.array([1, 2, 3])
    decoder.prefill(ids)
    torch.testing.assert_close(torch.as_tensor(decoder.decode(np.array([4]), 3)),
                               model(torch.as_tensor([[1, 2, 3, 4]]))[0][:, -1], atol=1e-5, rtol=0)
    assert sampling.TorchDecoder(model, 1, SampleConfig(), decodes=False).step is None and asked == [False]


def test_a_batch_larger_than_the_machine_s_memory_is_refused_before_it_is_made(model):
    with command_line(), pytest.raises(UsageError, match=r"^--num-samples 100,000,000 needs about [\d,.]+ GiB .* \(at"):
        next(generate_pieces(model, model.vocab, "he", SampleConfig(num_samples=10**8, seed=1)))
    with pytest.raises(UsageError, match=r"^num_samples 100,000,000 needs about"):  # (a notebook's: no list of 10**8
        model.generate("he", 5, num_samples=10**8)                                 # texts is made before the check)
    assert next(generate_pieces(model, model.vocab, "he", SampleConfig(num_samples=64, seed=1)))  # (a fair one runs)


def test_a_compiled_step_that_cannot_be_built_samples_uncompiled(model, torch_path, monkeypatch):
    """--compile where a C++ compiler is there but does not work failed after printing the prompt."""
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    def unbuildable(cache):
        def step(*args):
            raise InductorError(InvalidCxxCompiler(), None)
        return step
    cfg = SampleConfig(max_new_tokens=30, temperature=1.0, seed=4)
    eager = text_of(model, "he", cfg)
    monkeypatch.setattr("tfcli.sampling.kernel_decodes", lambda device: False)  # (where compiling is used)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: True)
    monkeypatch.setattr(type(model), "compiled_decoder", lambda self, cache: unbuildable(cache))
    assert text_of(model, "he", replace(cfg, compile=True)) == eager


def test_compiling_is_not_tried_on_a_cpu_without_a_compiler(model, monkeypatch):
    from tfcli.sampling import compiles
    monkeypatch.setattr("tfcli.sampling.kernel_decodes", lambda device: False)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: True)
    assert compiles(SampleConfig(compile=True), 1, model)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: False)
    assert not compiles(SampleConfig(compile=True), 1, model)
