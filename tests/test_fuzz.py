"""Property tests: whatever the input, the answer is right or a clean refusal, never a crash."""

import math
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tfcli.cli import app
from tfcli.config import SampleConfig, parse_duration
from tfcli.corpus import Vocab
from tfcli.errors import UsageError
from tfcli.sampling import filter_logits, new_rng, pick, tempered


@given(st.text(min_size=1, max_size=200))
def test_any_text_round_trips_through_its_own_vocabulary(text):
    vocab = Vocab.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_unknown_characters_are_refused_cleanly(known, other):
    vocab = Vocab.from_text(known)
    try:
        assert vocab.decode(vocab.encode(other)) == other
    except UsageError as e:
        assert e.exit_code == 2 and "vocabulary has no" in e.message


@given(st.text(max_size=12))
def test_duration_parser_answers_a_positive_number_or_refuses(text):
    try:
        seconds = parse_duration(text)
    except UsageError:
        return
    assert math.isfinite(seconds) and seconds > 0


finite = st.floats(-1e4, 1e4, allow_nan=False)
specials = st.sampled_from([float("-inf"), 0.0, 1e30, -1e30])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(finite, specials), min_size=2, max_size=12),
       st.floats(0.0, 5.0), st.one_of(st.none(), st.integers(1, 20)), st.one_of(st.none(), st.floats(0.0, 1.0)),
       st.one_of(st.none(), st.floats(0.0, 1.0)), st.floats(0.1, 3.0), st.floats(-2.0, 2.0))
def test_sampling_filters_keep_a_distribution(values, temperature, top_k, top_p, min_p, repeat, presence):
    logits = np.array([values], dtype=np.float32)
    if not np.isfinite(logits).any():
        logits[0, 0] = 0.0  # a model always gives some token a finite logit
    cfg = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat,
                       presence_penalty=presence)
    history = np.array([[0, 1, 1]])
    out = filter_logits(logits, cfg, history)
    assert not np.isnan(out).any() and np.isfinite(out).any()
    if temperature >= 1e-5:
        probs = tempered(out, temperature)
        assert not np.isnan(probs).any() and abs(probs.sum() - 1) < 1e-4
    token = pick(out, temperature, new_rng(0)).item()
    assert math.isfinite(out[0, token])


ARGS = st.lists(st.sampled_from(["train", "sample", "eval", "info", "inspect-attention", "bench", "--time", "x",
                                 "-n", "-1", "--top-k", "0", "--temperature", "nan", "--lr", "--view", "-m",
                                 "/nonexistent", "--json", "--help", "--seed", "abc", "--at", "99", "--preset"]),
                max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ARGS)
def test_random_command_lines_never_show_a_traceback(tmp_path_factory, args):
    if "bench" in args and "--help" not in args:
        return  # a real benchmark run, not parsing
    empty = tmp_path_factory.mktemp("cwd")
    here = os.getcwd()
    os.chdir(empty)  # no ./runs: nothing to load by default, nothing written anywhere that matters
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=True)
    finally:
        os.chdir(here)
    assert result.exit_code in (0, 1, 2), (args, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
