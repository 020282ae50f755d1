import os
from dataclasses import replace

import pytest

from tfcli import config
from tfcli.config import ModelConfig, SampleConfig, TrainConfig, parse_duration, with_overrides
from tfcli.errors import USAGE, UsageError, command_line


@pytest.mark.parametrize("text, seconds", [
    ("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), (" 2m 30s ", 150.0),
    ("5min", 300.0), ("90sec", 90.0), ("1hr30min", 5400.0), ("2MIN", 120.0),  # ("5min" was refused)
    ("5mins", 300.0), ("2hours", 7200.0), ("10 seconds", 10.0), ("1 minute", 60.0), ("250ms", 0.25),
])
def test_duration_reads_seconds_and_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-3x", "--3", "m", "5q3", "1h1h", "5s2m", "30s5"])
def test_unreadable_duration_is_a_usage_error(text):
    with pytest.raises(UsageError) as e:
        parse_duration(text)
    assert e.value.exit_code == USAGE == 2
    assert "duration" in e.value.message


@pytest.mark.parametrize("text", ["0", "0s", "0m0s", "-3", "-5m", " -1h30m"])
def test_zero_or_negative_duration_is_read_but_refused_as_not_positive(text):
    with pytest.raises(UsageError, match="must be positive"):
        parse_duration(text)


def test_defaults_are_valid():
    assert ModelConfig().validate() == ModelConfig()
    assert TrainConfig().validate() == TrainConfig()
    assert SampleConfig().validate() == SampleConfig()


def refused(config, cli: str, python: str) -> None:
    """`config.validate()` refuses, naming the setting as the CLI spells it under command_line()
    (where every command runs) and as Python spells it elsewhere (a notebook)."""
    with pytest.raises(UsageError, match=python):
        config.validate()
    with command_line(), pytest.raises(UsageError, match=cli):
        config.validate()


def test_n_embd_not_divisible_by_n_head_names_both():
    refused(ModelConfig(n_embd=30, n_head=4), r"--n-embd 30 must be divisible by --n-head 4",
            r"n_embd=30 must be divisible by n_head=4")


def test_odd_head_size_is_refused_for_rotary():
    with pytest.raises(UsageError, match="even"):
        ModelConfig(n_embd=12, n_head=4).validate()


@pytest.mark.parametrize("field", ["vocab_size", "n_layer", "n_head", "n_embd", "block_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_size_names_the_setting(field, value):
    refused(ModelConfig(**{field: value}), f"^--{field.replace('_', '-')} must be positive, got {value}$",
            f"^{field} must be positive, got {value}$")


@pytest.mark.parametrize("dropout", [-0.1, 1.0])
def test_dropout_outside_unit_interval_is_refused(dropout):
    refused(ModelConfig(dropout=dropout), "^--dropout must be in", "^dropout must be in")


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan"), 1e300])
def test_non_positive_lr_is_refused(lr):
    refused(TrainConfig(lr=lr), "^--lr must be positive", "^lr must be positive")


@pytest.mark.parametrize("changes, flag", [
    ({"batch_size": 0}, "--batch-size"), ({"max_steps": 0}, "--max-steps"), ({"time_budget": 0.0}, "--time"),
    ({"time_budget": float("nan")}, "--time"), ({"eval_interval": 0.0}, "--eval-interval"),
    ({"eval_interval": float("nan")}, "--eval-interval"), ({"dtype": "float8"}, "--dtype"),
])
def test_bad_train_settings_name_their_flag_or_field(changes, flag):
    refused(TrainConfig(**changes), f"^{flag} must", f"^{next(iter(changes))} must")


@pytest.mark.parametrize("changes, flag", [
    ({"temperature": -0.1}, "--temperature"), ({"top_k": -1}, "--top-k"), ({"top_p": 1.5}, "--top-p"),
    ({"min_p": -0.1}, "--min-p"), ({"repeat_penalty": 0.0}, "--repeat-penalty"),
    ({"num_samples": 0}, "--num-samples"), ({"stop": ("",)}, "--stop"), ({"max_new_tokens": -1}, "--max-new-tokens"),
])
def test_bad_sample_settings_name_their_flag_or_field(changes, flag):
    refused(SampleConfig(**changes), f"{flag} ", f"^{next(iter(changes))} ")


def test_model_config_round_trips_through_dict_ignoring_unknown_keys():
    cfg = ModelConfig(vocab_size=7, n_layer=3, n_head=2, n_embd=16, block_size=9, dropout=0.1)
    assert ModelConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg


def test_overrides_ignore_unset_flags():
    cfg = with_overrides(ModelConfig(n_layer=6), n_layer=None, n_head=8)
    assert (cfg.n_layer, cfg.n_head) == (6, 8)


def test_duration_reads_milliseconds():
    assert parse_duration("500ms") == 0.5


def test_a_stop_given_as_one_string_is_one_stop_string():
    from tfcli.config import SampleConfig

    assert SampleConfig(stop="\n\n").stop == ("\n\n",)
    assert SampleConfig(stop=["ab", "c"]).stop == ("ab", "c")


def test_cache_directory_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFCLI_CACHE", str(tmp_path / "mine"))
    assert config.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TFCLI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.cache_dir() == tmp_path / "xdg" / "tfcli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert config.cache_dir() == tmp_path / "home" / ".cache" / "tfcli"


@pytest.mark.parametrize("variable, value", [("HOME", ""), ("HOME", "relative"), ("XDG_CACHE_HOME", "relative")])
def test_an_empty_or_relative_home_is_not_taken_for_a_directory_here(monkeypatch, variable, value):
    import pwd

    monkeypatch.delenv("TFCLI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", pwd.getpwuid(os.getuid()).pw_dir)
    expected = config.cache_dir()
    monkeypatch.setenv(variable, value)  # (HOME="" wrote the cache to ./.cache, at / to /.cache)
    assert config.cache_dir() == expected and expected.is_absolute()


def test_with_no_home_to_be_found_the_cache_is_a_private_directory_not_a_shared_one(monkeypatch, tmp_path):
    import sys

    monkeypatch.delenv("TFCLI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setitem(sys.modules, "pwd", None)  # (as on Windows, or a uid with no account)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    home = config.home()
    assert home.parent == tmp_path and home.name.startswith("tfcli-")  # (made by mkdtemp: 0700, this process's)
    assert oct(home.stat().st_mode & 0o777) == "0o700"


def test_the_token_cache_and_the_kernel_cache_agree_on_a_tilde(tmp_path, monkeypatch):
    from tfcli import native, tokens

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TFCLI_CACHE", "~/tf")
    assert tokens.store_for(tokens.CACHE_MIN_BYTES).root == native.cache_dir() == tmp_path / "tf"


@pytest.mark.parametrize("changes, message", [
    (dict(seed=None), r"TrainConfig.seed must be int, got None"),
    (dict(max_steps="50"), r"TrainConfig.max_steps must be int or None, got '50'"),
    (dict(lr="1e-3"), r"TrainConfig.lr must be float"),
    (dict(batch_size=8.0), r"TrainConfig.batch_size must be int, got 8.0"),
    (dict(min_lr_ratio=-1.0), r"min_lr_ratio must be in \[0, 1\]"),  # (a negative lr: gradient ascent)
    (dict(cooldown=1.5), r"cooldown must be in \[0, 1\]"),
    (dict(sample_chars=-1), r"sample_chars must be >= 0"),
])
def test_a_notebook_s_train_config_is_checked_with_its_field_names(changes, message):
    with pytest.raises(UsageError, match=message):
        replace(TrainConfig(), **changes).validate()
    assert TrainConfig(lr=1, eval_interval=None).validate()  # (an int for a float; None for step-only validation)


@pytest.mark.parametrize("changes, message", [
    (dict(n_embd=32.0), r"^ModelConfig.n_embd must be int, got 32.0$"),
    (dict(n_layer="2"), r"^ModelConfig.n_layer must be int, got '2'$"),
    (dict(dropout="0.1"), r"^ModelConfig.dropout must be float, got '0.1'$"),
    (dict(block_size=True), r"^ModelConfig.block_size must be int, got True$"),
])
def test_a_notebook_s_model_config_is_checked_for_types(changes, message):
    with pytest.raises(UsageError, match=message):  # (n_embd=32.0 failed inside torch, "2" at a comparison)
        replace(ModelConfig(), **changes).validate()
    assert ModelConfig(dropout=0).validate()  # (an int for a float)

