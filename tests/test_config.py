import os
from dataclasses import replace

import pytest

from tfcli import config
from tfcli.config import PRESETS, ModelConfig, SampleConfig, TrainConfig, parse_duration, resolve_preset, with_overrides
from tfcli.errors import USAGE, UsageError, command_line


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    """These tests pick presets for a CPU with native bf16 unless they say otherwise, whatever this host is."""
    from tfcli import native
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: True)


@pytest.mark.parametrize("text, seconds", [
    ("300", 300.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("1.5h", 5400.0), (" 2m 30s ", 150.0),
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


def test_named_preset_is_returned_as_a_copy():
    got = resolve_preset("tiny", "cpu", None)
    assert got == PRESETS["tiny"]
    got["n_layer"] = 99
    assert PRESETS["tiny"]["n_layer"] == 2


@pytest.mark.parametrize("device, budget, name", [
    ("cuda", None, "large"), ("cuda:1", 60.0, "large"), ("cuda", 20.0, "large"), ("cuda", 19.9, "medium"),
    ("cuda", 12.0, "medium"), ("cuda", 11.9, "small"),
    ("cpu", 60.0, "small"), ("cpu", 239.0, "small"),
    ("cpu", 240.0, "medium"), ("cpu", None, "medium"), ("mps", 60.0, "small"),
])
def test_auto_preset_depends_on_device_and_budget(device, budget, name):
    assert resolve_preset("auto", device, budget) == PRESETS[name]


@pytest.mark.parametrize("budget, name, batch", [(60.0, "small", 16), (239.0, "small", 16), (240.0, "small", 32),
                                                (899.0, "small", 32), (900.0, "medium", 16), (None, "medium", 16)])
def test_auto_picks_for_a_cpu_that_trains_in_float32(budget, name, batch):
    # there the 0.8M model won 5 minutes too (1.483 against the 3.2M one's 1.661), and batches of 16
    # won 1 minute (1.75-1.82 against 32's 1.96): float32 steps cost 3-4x bf16's
    got = resolve_preset("auto", "cpu", budget, float32_cpu=True)
    assert got == {**PRESETS[name], "batch_size": batch}
    assert resolve_preset("auto", "cpu", 60.0, float32_cpu=True, batch_size=64)["batch_size"] == 64  # the user's
    assert resolve_preset("auto", "cuda", 60.0, float32_cpu=True) == PRESETS["large"]  # (a GPU's own table)
    assert resolve_preset("medium", "cpu", 60.0, float32_cpu=True) == PRESETS["medium"]


def test_preset_asks_the_cpu_whether_it_trains_in_float32(monkeypatch):
    from tfcli import native
    model, train = config.preset("auto", "cpu", 300.0, 1_000_000, dtype="float32")
    assert (model.n_embd, train.batch_size, train.epochs, train.dtype) == (128, 32, 6.0, "float32")  # (roomy)
    assert config.preset("auto", "cpu", 300.0, dtype="float16")[0].n_embd == 128  # (emulated on CPUs)
    assert config.preset("auto", "cpu", 300.0, dtype="bfloat16")[0].n_embd == 256
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU: float32 by itself
    assert config.preset("auto", "cpu", 300.0)[0].n_embd == 128
    assert config.preset("auto", "cpu:0", 300.0)[0].n_embd == 128
    assert config.preset("auto", "cpu", 300.0, dtype="bfloat16")[0].n_embd == 128  # emulated: slower still
    assert config.preset("auto", "cuda", 300.0)[0].n_embd == 384
    # 12K tokens/s for 5 minutes is ~3.6 passes over 1M characters (no dropout), ~36 over 100K (dropout)
    assert config.preset("auto", "cpu", 300.0, 100_000)[0].dropout == 0.2
    assert config.preset("auto", "cpu", 300.0, 1_000_000)[0].dropout == 0.0
    with pytest.raises(UsageError, match="dtype must be auto"):
        config.preset("auto", "cpu", 300.0, dtype="fp32")


def test_auto_regularises_runs_that_would_pass_over_a_small_text_many_times():
    # 5 CPU minutes of the medium preset read ~2.5M characters: 2.5 passes over tinyshakespeare's 1M,
    # so no dropout, and a faster host stops after 4 rather than memorising the text
    assert resolve_preset("auto", "cpu", 300.0, train_chars=1_000_000) == {**PRESETS["medium"], "epochs": 4.0}
    small = resolve_preset("auto", "cpu", 300.0, train_chars=100_000)  # ~25 passes
    assert small == {**PRESETS["medium"], "dropout": 0.2, "epochs": 10.0}
    assert resolve_preset("auto", "cuda", 300.0, train_chars=1_000_000)["epochs"] == 10.0  # a GPU reads far more
    assert "dropout" not in resolve_preset("auto", "cuda", 300.0, train_chars=10**10)
    assert resolve_preset("auto", "cuda", 300.0, train_chars=10**10)["epochs"] == 6.0  # (a roomy text: below)
    # 15 GPU seconds of the medium preset, start-up included, read ~3M characters: no dropout
    assert resolve_preset("auto", "cuda", 15.0, train_chars=1_000_000) == {**PRESETS["medium"], "epochs": 4.0}
    assert resolve_preset("auto", "cuda", 10.0, train_chars=1_000_000) == {**PRESETS["small"], "epochs": 6.0}
    tiny = resolve_preset("auto", "cpu", 300.0, train_chars=2000)  # 10 passes would be 5 steps: 200 instead
    medium = PRESETS["medium"]
    assert tiny["epochs"] * 2000 == pytest.approx(200 * medium["batch_size"] * medium["block_size"])


@pytest.mark.parametrize("budget", [300.0, 450.0, 570.0])
def test_a_text_with_a_character_a_hidden_weight_gets_six_passes_and_no_dropout(budget):
    """On a float32 CPU from 5.5 minutes, the 0.8M model on tinyshakespeare got dropout 0.2 and 10 passes
    (1.585 at 7.5 minutes) where 6 passes without scored 1.478, and 4 (at 5 minutes) 1.489."""
    small = PRESETS["small"]
    hidden = 12 * small["n_layer"] * small["n_embd"] ** 2
    assert resolve_preset("auto", "cpu", budget, 1_000_000, float32_cpu=True) == {**small, "epochs": 6.0}
    assert resolve_preset("auto", "cpu", budget, hidden, float32_cpu=True)["epochs"] == 6.0
    assert resolve_preset("auto", "cpu", budget, hidden - 1, float32_cpu=True) == {  # ~4.5 to 8.6 passes
        **small, "dropout": 0.2, "epochs": 10.0}
    assert resolve_preset("auto", "cpu", budget, 1_000_000, dropout=0.1, float32_cpu=True) == {**small, "dropout": 0.1}


def test_auto_limits_the_passes_by_the_dropout_the_run_will_have():
    medium = PRESETS["medium"]
    # the user's dropout decides: none on a small text stops at 4 passes, some on a large text is not limited
    assert resolve_preset("auto", "cpu", 300.0, 300_000, dropout=0.0) == {**medium, "dropout": 0.0, "epochs": 4.0}
    assert resolve_preset("auto", "cpu", 300.0, 1_000_000, dropout=0.1) == {**medium, "dropout": 0.1}
    assert resolve_preset("auto", "cpu", 300.0, 100_000, dropout=0.1) == {**medium, "dropout": 0.1, "epochs": 10.0}
    assert resolve_preset("medium", "cpu", 300.0, 100_000, dropout=0.1) == {**medium, "dropout": 0.1}
    assert resolve_preset("auto", "cpu", 300.0, dropout=0.3)["dropout"] == 0.3  # (no text yet: the shape alone)
    assert config.preset("auto", "cpu", 300.0, 1_000_000, dropout=0.1)[0].dropout == 0.1
    few = resolve_preset("auto", "cpu", 300.0, 2000, dropout=0.0)  # 4 passes would be 2 steps: 200 instead
    assert few["epochs"] * 2000 == pytest.approx(200 * medium["batch_size"] * medium["block_size"])
    # ...counted in the user's batches: 4 passes of 128 x 256 over 1M characters would be 123 steps
    big = resolve_preset("auto", "cpu", 300.0, 1_000_000, batch_size=128, block_size=256)
    assert big["batch_size"] == 128 and big["epochs"] * 1_000_000 == pytest.approx(200 * 128 * 256)
    model, train = config.preset("auto", "cpu", 300.0, 1_000_000, batch_size=128, block_size=64)
    assert (train.batch_size, model.block_size, train.epochs) == (128, 64, 4.0)


def test_auto_counts_passes_exactly_for_max_steps_and_leaves_the_step_count_alone():
    tokens_per_step = PRESETS["medium"]["batch_size"] * PRESETS["medium"]["block_size"]
    assert resolve_preset("auto", "cpu", None, train_chars=tokens_per_step, max_steps=4) == PRESETS["medium"]
    assert resolve_preset("auto", "cpu", None, train_chars=tokens_per_step, max_steps=5) == \
        {**PRESETS["medium"], "dropout": 0.2}  # 5 passes: dropout, but the run still takes its 5 steps


def test_preset_gives_a_notebook_the_configs_train_starts_from():
    model, train = config.preset("auto", "cpu", 60.0, train_chars=100_000)  # 60 s: small, and ~15 passes: regularised
    small = PRESETS["small"]
    assert (model.n_layer, model.n_embd, model.block_size, model.dropout) == (4, 128, 128, 0.2)
    assert (train.batch_size, train.lr, train.epochs, train.time_budget) == (small["batch_size"], small["lr"], 10.0, 60)
    model, train = config.preset("medium", time_budget=None, max_steps=500)
    assert model == replace(ModelConfig(), n_embd=256, block_size=256)
    assert (train.lr, train.max_steps, train.time_budget, train.epochs) == (PRESETS["medium"]["lr"], 500, None, None)


def test_named_presets_ignore_the_text_size():
    assert resolve_preset("medium", "cpu", 300.0, train_chars=1000) == PRESETS["medium"]


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UsageError, match="unknown preset 'huge'.*auto, tiny, small, medium, large"):
        resolve_preset("huge", "cpu", None)


def test_overrides_ignore_unset_flags():
    cfg = with_overrides(ModelConfig(n_layer=6), n_layer=None, n_head=8)
    assert (cfg.n_layer, cfg.n_head) == (6, 8)


def test_duration_reads_milliseconds():
    assert parse_duration("500ms") == 0.5


def test_a_stop_given_as_one_string_is_one_stop_string():
    from tfcli.config import SampleConfig

    assert SampleConfig(stop="\n\n").stop == ("\n\n",)
    assert SampleConfig(stop=["ab", "c"]).stop == ("ab", "c")


def test_adamw_gets_its_own_learning_rate_not_muon_s():
    assert config.preset("small", "cpu", 60.0)[1].lr == PRESETS["small"]["lr"]
    adamw = config.preset("small", "cpu", 60.0, optimizer="adamw")[1]
    assert (adamw.lr, adamw.optimizer) == (config.ADAMW_LR, "adamw") and adamw.lr < PRESETS["small"]["lr"] / 2


def test_preset_picks_for_the_device_train_would_use(monkeypatch):
    import torch

    from tfcli import device
    monkeypatch.setattr(device, "pick_device", lambda name="auto": torch.device("cuda"))  # (a GPU machine)
    assert config.preset(time_budget=60)[0].n_embd == PRESETS["large"]["n_embd"]
    assert config.preset(device="cpu", time_budget=60)[0].n_embd == PRESETS["small"]["n_embd"]


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


def test_preset_with_a_step_limit_alone_has_no_time_limit_as_the_cli_s_has_none():
    assert config.preset("tiny", "cpu", max_steps=100)[1].time_budget is None
    assert config.preset("tiny", "cpu")[1].time_budget == config.DEFAULT_CPU_TIME
    with pytest.raises(UsageError, match="optimizer must be muon or adamw"):
        config.preset("tiny", "cpu", optimizer="AdamW")


@pytest.mark.parametrize("given, message", [
    (dict(time_budget="2m"), r"^preset's time_budget must be float or None, got '2m'$"),
    (dict(device=1), r"^preset's device must be str or None, got 1$"),
    (dict(time_budget=-5), r"^preset's time_budget must be positive, got -5$"),
    (dict(max_steps=0), r"^preset's max_steps must be positive, got 0$"),
    (dict(batch_size=2.0), r"^preset's batch_size must be int or None, got 2.0$"),
    (dict(train_chars=-5), r"^preset's train_chars must be positive"),
])
def test_preset_checks_a_notebook_s_arguments(given, message):
    with pytest.raises(UsageError, match=message):  # (they failed at a comparison or .split, or came back)
        config.preset("auto", **given)


def test_whether_a_text_is_roomy_counts_the_users_model_shape():
    """--n-embd 256 on tinyshakespeare is a 3.1M-weight model, which the 3.2M one's measurements say to
    stop at 4 passes, whatever the preset's own shape."""
    assert resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True)["epochs"] == 6.0
    wide = resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True, n_embd=256)
    assert (wide["n_embd"], wide["epochs"]) == (256, 4.0)
    assert resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True, n_layer=2)["epochs"] == 6.0
    model, _ = config.preset("auto", "cpu", 300.0, 1_000_000, n_layer=3, n_embd=64)
    assert (model.n_layer, model.n_embd) == (3, 64)
    with pytest.raises(UsageError, match="preset's n_embd must be int"):
        config.preset("auto", "cpu", 300.0, n_embd=64.0)
