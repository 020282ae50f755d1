"""Presets: the model size, batch and run length `tfcli train` picks for a device, a time budget
and a text.

Plain data and arithmetic on it, measured on the machines the comments name. Nothing here
imports torch at import time: the CLI resolves a preset before deciding whether torch is needed.
"""

from __future__ import annotations

from .config import ModelConfig, TrainConfig, is_of_type
from .errors import UsageError, setting

# Presets name a model size and batch; `auto` resolves to one of them for the device
# and time budget (see `resolve_preset`). Sizes are nanoGPT-like so figures compare.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16, lr=3e-3),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32, lr=6e-3),
    "medium": dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch_size=16, lr=7.5e-3),
    "large": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, lr=3e-3),
}
PRESET_NAMES = ("auto", *PRESETS)
DEFAULT_CPU_TIME = 300.0  # a run given neither --time nor --max-steps gets this budget
SHORT_UNDER = 240.0  # a CPU budget below this trains the small preset (below FLOAT32_CPU_MEDIUM_FROM in float32)

# Training tokens/s of each preset where it was measured (2-core Zen 4 CPU: compiled, bf16, averaged over
# 60 s (small) and 300 s (medium) runs, start-up and validation included; an H200:
# large with dropout, eager; medium over 15-20 s runs and small over 10-12 s ones, start-up included, as auto
# picks them only for those). Only used to guess how many times a run will pass over its text.
NOMINAL_TOKENS_PER_S = {"cpu": {"tiny": 60e3, "small": 24e3, "medium": 8.6e3, "large": 3e3},
                        "gpu": {"small": 6e4, "medium": 2e5, "large": 1e6},
                        "cpu-float32": {"small": 12e3, "medium": 4e3, "short": 23e3}}
# (a 2-core AVX2 Zen 3: small 9-14K, medium 3.9K, FLOAT32_CPU_SHORT's 2 layers 21-25K)
# A CPU without native bf16 (AVX2 only, as most laptops) trains in float32 at a third to a quarter of the
# speed. On a 2-core AVX2 Zen 3 the 0.8M model won 5 minutes (1.483 against the 3.2M one's 1.661) and, in
# batches of 16, 1 minute (1.75-1.82 against batch 32's 1.96; FLOAT32_CPU_SHORT's smaller one has since won);
# in 10 minutes the 3.2M one scored 1.491 / 1.502 and the 0.8M one, ending after its 6 passes over that roomy
# text at 7:12, 1.476 / 1.478; in 15 the 3.2M one scored 1.470 (README, "A CPU without bfloat16").
FLOAT32_CPU_MEDIUM_FROM = 900.0
# Below FLOAT32_CPU_SHORT_UNDER such a CPU makes too few steps for depth and a long context to pay: a shallower
# model with a shorter context, whose steps cost half as much, learns more. There, `--time 60` (full-pass
# validation loss, three to six runs each): the small preset in batches of 16 read 1.737-1.786; with context 64
# in batches of 32 1.690-1.730; 3 layers of that 1.664-1.691, 2 layers 1.635-1.653 (1 layer 1.687-1.693, 2 of
# 96 wide 1.647-1.650, 2 in batches of 16 1.652-1.653). Single runs: at 120 s 2 layers 1.567 against 1.590; at
# 180 s, both compiled, 1.538 / 1.539 against 1.538; at 230 s 1.529 against 1.509, so from 3 minutes the small
# preset stays, in batches of 16 below 4 minutes. A --block-size alone keeps FLOAT32_CPU_SHORT_TOKENS a batch.
FLOAT32_CPU_SHORT = dict(n_layer=2, block_size=64, batch_size=32)
FLOAT32_CPU_SHORT_TOKENS = 2048
FLOAT32_CPU_SHORT_UNDER = 180.0
FLOAT32_CPU_SHORT_BATCH = 16  # from FLOAT32_CPU_SHORT_UNDER to 4 minutes (1.75-1.82 at 60 s against batch 32's 1.96)
# A GPU run's first step comes 7-12 s in (an H200): below these budgets a smaller model learns more in what is left
GPU_SHORT_BUDGETS = (("small", 12.0), ("medium", 20.0))
MANY_PASSES = 4.0  # beyond this many passes over the text, a model without dropout memorises it...
ROOMY_PASSES = 6.0  # ...unless the text has ROOMY_CHARS_PER_WEIGHT or more per hidden weight (see `is_roomy`)
ROOMY_CHARS_PER_WEIGHT = 0.5
SMALL_DATA = dict(dropout=0.2, epochs=10.0)  # see README, "Small texts"
MIN_STEPS = 200  # ...and never fewer steps: 10 passes over a 2K text would be 5 steps, too few to learn anything


def resolve_preset(name: str, device: str, time_budget: float | None, train_chars: int | None = None,
                   max_steps: int | None = None, dropout: float | None = None, batch_size: int | None = None,
                   block_size: int | None = None, float32_cpu: bool = False, n_layer: int | None = None,
                   n_embd: int | None = None) -> dict:
    """Pick the preset that trains best in the budget: smaller models win short runs.

    `auto` also fits the regime to the text (unless --max-steps sets the length). A run that would
    pass over it more than MANY_PASSES times gets dropout and ends after SMALL_DATA's epochs or
    MIN_STEPS steps, whichever is longer; one without dropout (as `dropout`, the user's, may also
    say) ends after MANY_PASSES passes, so a host faster than NOMINAL_TOKENS_PER_S stops early
    rather than memorising its text (README, "Small texts", has the measurements). A text with half
    a character or more per hidden weight (`is_roomy`) gets no dropout and ROOMY_PASSES. `dropout`,
    `batch_size`, `block_size`, `n_layer` and `n_embd` are the user's, which the limits are fitted
    to. `float32_cpu`: the device is a CPU that trains in float32 (see `cpu_trains_in_float32`),
    several times slower, where a short budget gets FLOAT32_CPU_SHORT's shallower model.
    """
    if name not in PRESET_NAMES:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    given = {k: v for k, v in dict(dropout=dropout, batch_size=batch_size, block_size=block_size, n_layer=n_layer,
                                   n_embd=n_embd).items() if v is not None}
    if name != "auto":
        return dict(PRESETS[name], **given)
    sizing = DEFAULT_CPU_TIME if time_budget is None else time_budget  # (--max-steps alone: as for 5 minutes)
    short = sizing < SHORT_UNDER
    float32 = float32_cpu and not device.startswith("cuda")
    if device.startswith("cuda"):
        name = next((n for n, under in GPU_SHORT_BUDGETS if sizing < under), "large")
    elif float32:
        name = "small" if sizing < FLOAT32_CPU_MEDIUM_FROM else "medium"
    else:
        name = "small" if short else "medium"
    picked = {**PRESETS[name], **(_float32_fit(sizing, given) if float32 else {}), **given}
    if not train_chars:
        return picked
    speed = "gpu" if device.startswith("cuda") else "cpu-float32" if float32 else "cpu"
    roomy = is_roomy(picked, train_chars)
    rated = "short" if float32 and sizing < FLOAT32_CPU_SHORT_UNDER else name
    many = not roomy and expected_passes(rated, speed, picked, time_budget, max_steps, train_chars) > MANY_PASSES
    if many and dropout is None:
        picked["dropout"] = SMALL_DATA["dropout"]
    if max_steps is None:
        floor = MIN_STEPS * picked["batch_size"] * picked["block_size"] / train_chars
        if not picked.get("dropout"):
            picked["epochs"] = max(ROOMY_PASSES if roomy else MANY_PASSES, floor)
        elif many:
            picked["epochs"] = max(SMALL_DATA["epochs"], floor)
    return picked


def _float32_fit(sizing: float, given: dict) -> dict:
    """What a CPU that trains in float32 changes in the small preset for a budget under 4 minutes. Under
    FLOAT32_CPU_SHORT_UNDER a batch keeps its tokens when only the context is the user's: a 60 s run of
    context 128 in batches of 32 read 1.962 where batches of 16 read 1.737-1.786."""
    if sizing >= SHORT_UNDER:
        return {}
    if sizing >= FLOAT32_CPU_SHORT_UNDER:
        return {"batch_size": FLOAT32_CPU_SHORT_BATCH}
    if "block_size" in given and "batch_size" not in given:
        return {**FLOAT32_CPU_SHORT, "batch_size": max(1, FLOAT32_CPU_SHORT_TOKENS // given["block_size"])}
    return FLOAT32_CPU_SHORT


def is_roomy(preset: dict, train_chars: int) -> bool:
    """Whether the text has ROOMY_CHARS_PER_WEIGHT characters or more per hidden weight: then auto adds
    no dropout, and a run ends after ROOMY_PASSES passes rather than MANY_PASSES.

    On tinyshakespeare (1M characters) the 0.8M model (0.79M hidden weights) scored 1.489 after 4
    passes and 1.478 after 6, and dropout 0.2 cost it more than it saved (1.585 after 4.6 passes,
    1.513 after 9). At half a character a weight it still did: on the text's first 450K characters
    in 5 minutes, 1.893 after 6 passes without dropout against 1.949 with it, and FLOAT32_CPU_SHORT's
    model (0.39M) on names.txt (205K) in 1 minute 1.488 after 6 passes against 1.531-1.543 with
    dropout 0.2. The 3.2M model (3.1M) on tinyshakespeare, a third of a character a weight, was best at
    3.5-5.3 passes (1.461-1.475) and read 1.506 after 6.9. Small texts gain from dropout (README,
    "Small texts"). Bigger models on bigger texts (a GPU's) follow the same rule unmeasured."""
    hidden = 12 * preset["n_layer"] * preset["n_embd"] ** 2  # attention 4 d², MLP 8 d², a layer
    return train_chars >= ROOMY_CHARS_PER_WEIGHT * hidden


# AdamW's lr whatever the size: the presets' are Muon's, 2-4x what AdamW stands. Measured (README,
# "Choices worth knowing"): the 0.8M shape did best at 1.5e-3 (3e-3 close, 6e-3 worst), 10.7M at 2e-3.
ADAMW_LR = 2e-3


def preset(name: str = "auto", device: str | None = None, time_budget: float | None = None,
           train_chars: int | None = None, max_steps: int | None = None, optimizer: str = "muon",
           dropout: float | None = None, batch_size: int | None = None,
           block_size: int | None = None, dtype: str = "auto", n_layer: int | None = None,
           n_embd: int | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings `tfcli train --preset NAME` starts from, as a notebook's
    `tfcli.train` wants them: `auto` picks by device, budget (seconds) and the training text's
    length in characters (a run without dropout ends after MANY_PASSES passes over its text, or
    ROOMY_PASSES over one with half a character or more per hidden weight; a short text gets dropout and a
    longer limit; `dropout`, `batch_size`, `block_size`, `n_layer` and `n_embd`, when given, are used,
    and the limits fitted to them); the budget and step limit come along. Without either, the
    budget is 5 minutes, as `tfcli train`'s; with max_steps alone there is no time limit, as with
    `tfcli train --max-steps`. Each field can then be changed with `dataclasses.replace` (a longer
    budget given that way still ends at auto's `epochs`: give it to `preset`, or replace both).
    `device`: cpu, cuda, cuda:N or mps (None: the one `train` would use); on a CPU, `dtype` (as
    TrainConfig's) and the CPU say whether it trains at bf16's speed or float32's, and auto picks for it. The lr is the
    preset's for Muon, ADAMW_LR for AdamW."""
    if optimizer not in ("muon", "adamw"):
        raise UsageError(f"optimizer must be muon or adamw, got {optimizer!r}")
    _check_preset_args(device=(device, str), time_budget=(time_budget, float), max_steps=(max_steps, int),
                       train_chars=(train_chars, int), batch_size=(batch_size, int), block_size=(block_size, int),
                       n_layer=(n_layer, int), n_embd=(n_embd, int))
    if device is None:
        from .device import pick_device
        device = pick_device("auto").type
    elif device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}")
    if dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise UsageError(f"{setting('dtype')} must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if time_budget is None and max_steps is None:
        time_budget = DEFAULT_CPU_TIME
    float32 = device.split(":")[0] == "cpu" and cpu_trains_in_float32(dtype)
    picked = resolve_preset(name, device, time_budget, train_chars, max_steps, dropout, batch_size, block_size,
                            float32, n_layer, n_embd)
    lr = picked.pop("lr")
    if optimizer == "adamw":
        lr = ADAMW_LR
    train = TrainConfig(batch_size=picked.pop("batch_size"), lr=lr, epochs=picked.pop("epochs", None),
                        time_budget=time_budget, max_steps=max_steps, optimizer=optimizer, dtype=dtype)
    return ModelConfig(**picked), train


def cpu_trains_in_float32(dtype: str = "auto") -> bool:
    """Whether training on this CPU runs at float32's speed or slower: float32 asked for, float16
    (emulated on CPUs), or a CPU without native bf16 (AVX512_BF16 or AMX), where bf16 is emulated
    too and auto is float32 (device.pick_dtype)."""
    if dtype in ("float32", "float16"):
        return True
    from .native import cpu_has_native_bf16
    return not cpu_has_native_bf16()


def _check_preset_args(**given: tuple) -> None:
    """A notebook's preset("auto", time_budget="2m") failed at a comparison, device=1 at .split; and
    time_budget=-5 came back as a config that only train refused."""
    for name, (value, kind) in given.items():
        if value is not None and not is_of_type(value, kind):
            raise UsageError(f"preset's {name} must be {kind.__name__} or None, got {value!r}")
        if kind is not str and value is not None and value <= 0:
            raise UsageError(f"preset's {name} must be positive, got {value!r}")


def expected_passes(name: str, speed: str, preset: dict, time_budget: float | None, max_steps: int | None,
                    train_chars: int) -> float:
    """How many times the run would read its training text: exact for --max-steps, a guess from
    NOMINAL_TOKENS_PER_S[speed] for a time budget (whichever ends the run first)."""
    tokens = []
    if max_steps is not None:
        tokens.append(max_steps * preset["batch_size"] * preset["block_size"])
    if time_budget is not None:
        rate = NOMINAL_TOKENS_PER_S[speed][name]
        tokens.append(time_budget * rate)
    return min(tokens) / train_chars if tokens else 0.0
