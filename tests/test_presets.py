"""What `--preset auto` picks for a device, a time budget and a text, and what `preset()` hands a notebook."""

import subprocess
import sys
from dataclasses import replace

import pytest

from tfcli import presets
from tfcli.config import ModelConfig
from tfcli.errors import UsageError
from tfcli.presets import PRESETS, resolve_preset


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    """These tests pick presets for a CPU with native bf16 unless they say otherwise, whatever this host is."""
    from tfcli import native
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: True)


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


SHORT = {**PRESETS["small"], **presets.FLOAT32_CPU_SHORT}
SMALL16 = {**PRESETS["small"], "batch_size": 16}


@pytest.mark.parametrize("budget, picked", [(60.0, SHORT), (179.0, SHORT), (180.0, SMALL16), (239.0, SMALL16),
                                            (240.0, PRESETS["small"]), (899.0, PRESETS["small"]),
                                            (900.0, PRESETS["medium"]), (None, PRESETS["small"])])
def test_auto_picks_for_a_cpu_that_trains_in_float32(budget, picked):
    # there the 0.8M model won 5 minutes too (1.483 against the 3.2M one's 1.661), and 2 layers with
    # context 64 won 1 minute (1.635-1.653 against the 0.8M one's 1.737-1.786) and 2 (1.567 against 1.590),
    # tied at 3 (1.538 against 1.538) and lost at 3:50 (1.529 against 1.509): float32 steps cost 3-4x bf16's
    assert resolve_preset("auto", "cpu", budget, float32_cpu=True) == picked
    assert SHORT["n_layer"] == 2 and SHORT["block_size"] == 64 and SHORT["batch_size"] == 32
    assert resolve_preset("auto", "cpu", 60.0, float32_cpu=True, batch_size=64)["batch_size"] == 64  # the user's


def test_a_short_float32_run_keeps_its_batch_tokens_when_the_user_sets_only_the_context():
    """Context 128 in batches of 32 read 1.962 in a 60 s run where batches of 16 read 1.737-1.786."""
    def pick(**given):
        got = resolve_preset("auto", "cpu", 60.0, float32_cpu=True, **given)
        return got["n_layer"], got["block_size"], got["batch_size"]
    assert pick(block_size=128) == (2, 128, 16)
    assert pick(block_size=4096) == (2, 4096, 1)
    assert pick(block_size=128, batch_size=32) == (2, 128, 32)
    assert pick(n_layer=4) == (4, 64, 32)
    assert resolve_preset("auto", "cpu", 60.0, block_size=128)["batch_size"] == PRESETS["small"]["batch_size"]


def test_a_short_float32_run_guesses_its_passes_at_its_own_speed():
    """The 2-layer model reads ~23K tokens/s there, twice the 0.8M one: a 190K text is read ~7.3 times in a
    minute, past MANY_PASSES, so it gets dropout and a longer limit (at 12K tokens/s, 3.8 passes, it would not)."""
    got = resolve_preset("auto", "cpu", 60.0, 190_000, float32_cpu=True)
    assert (got["dropout"], got["epochs"]) == (presets.SMALL_DATA["dropout"], presets.SMALL_DATA["epochs"])
    assert presets.expected_passes("small", "cpu-float32", got, 60.0, None, 190_000) < presets.MANY_PASSES
    assert resolve_preset("auto", "cuda", 60.0, float32_cpu=True) == PRESETS["large"]  # (a GPU's own table)
    assert resolve_preset("medium", "cpu", 60.0, float32_cpu=True) == PRESETS["medium"]


def test_preset_asks_the_cpu_whether_it_trains_in_float32(monkeypatch):
    from tfcli import native
    model, train = presets.preset("auto", "cpu", 300.0, 1_000_000, dtype="float32")
    assert (model.n_embd, train.batch_size, train.epochs, train.dtype) == (128, 32, 6.0, "float32")  # (roomy)
    assert presets.preset("auto", "cpu", 300.0, dtype="float16")[0].n_embd == 128  # (emulated on CPUs)
    assert presets.preset("auto", "cpu", 300.0, dtype="bfloat16")[0].n_embd == 256
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU: float32 by itself
    assert presets.preset("auto", "cpu", 300.0)[0].n_embd == 128
    assert presets.preset("auto", "cpu:0", 300.0)[0].n_embd == 128
    assert presets.preset("auto", "cpu", 300.0, dtype="bfloat16")[0].n_embd == 128  # emulated: slower still
    assert presets.preset("auto", "cuda", 300.0)[0].n_embd == 384
    # 12K tokens/s for 5 minutes is ~3.6 passes over 1M characters (no dropout), ~36 over 100K (dropout)
    assert presets.preset("auto", "cpu", 300.0, 100_000)[0].dropout == 0.2
    assert presets.preset("auto", "cpu", 300.0, 1_000_000)[0].dropout == 0.0
    with pytest.raises(UsageError, match="dtype must be auto"):
        presets.preset("auto", "cpu", 300.0, dtype="fp32")


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
def test_a_text_with_half_a_character_a_hidden_weight_gets_six_passes_and_no_dropout(budget):
    """On a float32 CPU from 5.5 minutes, the 0.8M model on tinyshakespeare got dropout 0.2 and 10 passes
    (1.585 at 7.5 minutes) where 6 passes without scored 1.478, and 4 (at 5 minutes) 1.489; on its first
    450K characters (0.57 a weight) in 5 minutes 6 passes without read 1.89 against 1.93-1.95 with it."""
    small = PRESETS["small"]
    half = 12 * small["n_layer"] * small["n_embd"] ** 2 // 2
    assert resolve_preset("auto", "cpu", budget, 1_000_000, float32_cpu=True) == {**small, "epochs": 6.0}
    assert resolve_preset("auto", "cpu", budget, half, float32_cpu=True) == {**small, "epochs": 6.0}
    assert resolve_preset("auto", "cpu", budget, half - 1, float32_cpu=True) == {  # ~9 to 17 passes
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
    assert presets.preset("auto", "cpu", 300.0, 1_000_000, dropout=0.1)[0].dropout == 0.1
    few = resolve_preset("auto", "cpu", 300.0, 2000, dropout=0.0)  # 4 passes would be 2 steps: 200 instead
    assert few["epochs"] * 2000 == pytest.approx(200 * medium["batch_size"] * medium["block_size"])
    # ...counted in the user's batches: 4 passes of 128 x 256 over 1M characters would be 123 steps
    big = resolve_preset("auto", "cpu", 300.0, 1_000_000, batch_size=128, block_size=256)
    assert big["batch_size"] == 128 and big["epochs"] * 1_000_000 == pytest.approx(200 * 128 * 256)
    model, train = presets.preset("auto", "cpu", 300.0, 1_000_000, batch_size=128, block_size=64)
    assert (train.batch_size, model.block_size, train.epochs) == (128, 64, 4.0)


def test_auto_counts_passes_exactly_for_max_steps_and_leaves_the_step_count_alone():
    tokens_per_step = PRESETS["medium"]["batch_size"] * PRESETS["medium"]["block_size"]
    assert resolve_preset("auto", "cpu", None, train_chars=tokens_per_step, max_steps=4) == PRESETS["medium"]
    assert resolve_preset("auto", "cpu", None, train_chars=tokens_per_step, max_steps=5) == \
        {**PRESETS["medium"], "dropout": 0.2}  # 5 passes: dropout, but the run still takes its 5 steps


def test_preset_gives_a_notebook_the_configs_train_starts_from():
    model, train = presets.preset("auto", "cpu", 60.0, train_chars=100_000)  # 60 s: small, and ~15 passes: regularised
    small = PRESETS["small"]
    assert (model.n_layer, model.n_embd, model.block_size, model.dropout) == (4, 128, 128, 0.2)
    assert (train.batch_size, train.lr, train.epochs, train.time_budget) == (small["batch_size"], small["lr"], 10.0, 60)
    model, train = presets.preset("medium", time_budget=None, max_steps=500)
    assert model == replace(ModelConfig(), n_embd=256, block_size=256)
    assert (train.lr, train.max_steps, train.time_budget, train.epochs) == (PRESETS["medium"]["lr"], 500, None, None)


def test_named_presets_ignore_the_text_size():
    assert resolve_preset("medium", "cpu", 300.0, train_chars=1000) == PRESETS["medium"]


def test_unknown_preset_lists_the_choices():
    with pytest.raises(UsageError, match="unknown preset 'huge'.*auto, tiny, small, medium, large"):
        resolve_preset("huge", "cpu", None)


def test_adamw_gets_its_own_learning_rate_not_muon_s():
    assert presets.preset("small", "cpu", 60.0)[1].lr == PRESETS["small"]["lr"]
    adamw = presets.preset("small", "cpu", 60.0, optimizer="adamw")[1]
    assert (adamw.lr, adamw.optimizer) == (presets.ADAMW_LR, "adamw") and adamw.lr < PRESETS["small"]["lr"] / 2


def test_preset_picks_for_the_device_train_would_use(monkeypatch):
    import torch

    from tfcli import device
    monkeypatch.setattr(device, "pick_device", lambda name="auto": torch.device("cuda"))  # (a GPU machine)
    assert presets.preset(time_budget=60)[0].n_embd == PRESETS["large"]["n_embd"]
    assert presets.preset(device="cpu", time_budget=60)[0].n_embd == PRESETS["small"]["n_embd"]


def test_preset_with_a_step_limit_alone_has_no_time_limit_as_the_cli_s_has_none():
    assert presets.preset("tiny", "cpu", max_steps=100)[1].time_budget is None
    assert presets.preset("tiny", "cpu")[1].time_budget == presets.DEFAULT_CPU_TIME
    with pytest.raises(UsageError, match="optimizer must be muon or adamw"):
        presets.preset("tiny", "cpu", optimizer="AdamW")


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
        presets.preset("auto", **given)


def test_names_in_a_float32_minute_gets_no_dropout_and_six_passes():
    """names.txt (205K characters, half a character per weight of the 2-layer model) in a float32 minute:
    1.488 after 6 passes without dropout, 1.531-1.543 with the dropout a smaller text gets."""
    names = resolve_preset("auto", "cpu", 60.0, 205_000, float32_cpu=True)
    assert (names["n_layer"], "dropout" in names, names["epochs"]) == (2, False, presets.ROOMY_PASSES)
    smaller = resolve_preset("auto", "cpu", 60.0, 196_607, float32_cpu=True)
    assert (smaller["n_layer"], smaller["dropout"], smaller["epochs"]) == (2, 0.2, 10.0)


def test_whether_a_text_is_roomy_counts_the_users_model_shape():
    """--n-embd 256 on tinyshakespeare is a 3.1M-weight model, which the 3.2M one's measurements say to
    stop at 4 passes, whatever the preset's own shape."""
    assert resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True)["epochs"] == 6.0
    wide = resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True, n_embd=256)
    assert (wide["n_embd"], wide["epochs"]) == (256, 4.0)
    assert resolve_preset("auto", "cpu", 300.0, 1_000_000, float32_cpu=True, n_layer=2)["epochs"] == 6.0
    model, _ = presets.preset("auto", "cpu", 300.0, 1_000_000, n_layer=3, n_embd=64)
    assert (model.n_layer, model.n_embd) == (3, 64)
    with pytest.raises(UsageError, match="preset's n_embd must be int"):
        presets.preset("auto", "cpu", 300.0, n_embd=64.0)


def test_presets_import_without_torch():
    """The CLI resolves a preset before it knows whether torch is needed (`tfcli --help` must not load it)."""
    code = "import sys, tfcli.presets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("device, float32", [("cpu", True), ("cpu", False), ("cuda", False)])
def test_a_step_limit_alone_picks_as_for_the_default_five_minutes(device, float32):
    """As README says: a float32 CPU's `--max-steps 500` got the 3.2M model, `--max-steps 500 --time 5m` the 0.8M."""
    five_minutes = resolve_preset("auto", device, presets.DEFAULT_CPU_TIME, float32_cpu=float32)
    assert resolve_preset("auto", device, None, max_steps=500, float32_cpu=float32) == five_minutes
    model, train = presets.preset("auto", "cpu", max_steps=500, dtype="float32")
    assert (model.n_embd, train.batch_size, train.time_budget) == (128, PRESETS["small"]["batch_size"], None)
