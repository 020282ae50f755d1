"""Configuration as frozen dataclasses, and the presets as plain data.

Everything a run depends on lives here so that it can be stored in a checkpoint
(as JSON) and compared on `--resume`. Nothing here imports torch: the CLI builds
these objects before deciding whether torch is needed at all.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import UsageError, setting

ROPE_BASE = 10_000.0  # rotary positions' base wavelength, shared by every implementation of the model


@dataclass(frozen=True)
class ModelConfig:
    """The transformer's shape (`train` sets vocab_size from the corpus). The defaults are the `small`
    preset's; `preset()` gives what `tfcli train` would pick."""

    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0

    def validate(self) -> ModelConfig:
        check_types(self)  # (n_embd=32.0 failed inside torch's embedding)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{setting(name)} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UsageError(f"{setting('n_embd', self.n_embd)} must be divisible by {setting('n_head', self.n_head)}")
        if (self.n_embd // self.n_head) % 2:
            raise UsageError(f"the head size, {setting('n_embd', self.n_embd)} / {setting('n_head', self.n_head)} = "
                             f"{self.n_embd // self.n_head}, must be even (rotary positions)")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"{setting('dropout')} must be in [0, 1), got {self.dropout}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight `tfcli.model.GPT` has, by its state-dict name (without building one)."""
        C = self.n_embd
        shapes = {"wte.weight": (self.vocab_size, C)}
        for i in range(self.n_layer):
            shapes |= {f"blocks.{i}.attn.qkv.weight": (3 * C, C), f"blocks.{i}.attn.proj.weight": (C, C),
                       f"blocks.{i}.mlp.fc.weight": (4 * C, C), f"blocks.{i}.mlp.proj.weight": (C, 4 * C)}
        return shapes | {"head.weight": (self.vocab_size, C)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_seed(seed: int) -> None:
    """PyTorch's generators take 64-bit seeds; a larger one was a ValueError deep in a run."""
    if not -2**63 <= seed < 2**64:
        raise UsageError(f"{setting('seed')} must fit in 64 bits ({-2**63} to {2**64 - 1}), got {seed}")


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains: times in seconds. The batch and lr defaults are generic: `tfcli train` takes
    them from its preset, tuned per size (`preset()` gives the same pair to a notebook)."""

    batch_size: int = 32
    grad_accum: int = 1  # micro-batches per step and process: the same step in less memory
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # final lr as a share of lr, reached at the end of cooldown
    warmup_steps: int = 30
    cooldown: float = 0.4  # last share of the run (steps or time) spent decaying lr (1 - sqrt shape)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    epochs: float | None = None  # passes over the training text; the run ends at whichever limit comes first
    time_budget: float | None = None  # seconds of wall clock, start-up and evaluation included
    eval_interval: float | None = 30.0  # seconds between validations (step rates vary 100x across models);
    eval_steps: int | None = 250  # ...or this many steps, if sooner: on a GPU 30 s can be dozens of epochs
    # (eval_interval None: every eval_steps steps only, nanoGPT's way, so runs validate at the same steps)
    eval_tokens: int = 16384  # fixed val subset scored during training; the full pass is `tfcli eval`
    # (16K characters cost a 3.2M model 0.6 s on 2 cores: 2% of a 5-minute run over its ten evaluations)
    sample_chars: int = 80
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool | None = None  # None: when a compiler is present (see device.should_compile)
    optimizer: str = "muon"  # muon (Muon for hidden matrices, AdamW for the rest) | adamw

    def validate(self) -> TrainConfig:
        check_types(self)
        for name in ("min_lr_ratio", "cooldown"):
            if not 0 <= getattr(self, name) <= 1:
                raise UsageError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.sample_chars < 0 or self.eval_tokens <= 0:
            raise UsageError(f"sample_chars must be >= 0 and eval_tokens positive, got {self.sample_chars} and "
                             f"{self.eval_tokens}")
        if self.batch_size <= 0:
            raise UsageError(f"{setting('batch_size')} must be positive, got {self.batch_size}")
        if self.grad_accum <= 0:
            raise UsageError(f"{setting('grad_accum')} must be positive, got {self.grad_accum}")
        if not (_float32(self.lr) and self.lr > 0):
            raise UsageError(f"{setting('lr')} must be positive (and within float32's range), got {self.lr}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise UsageError(f"{setting('max_steps')} must be positive, got {self.max_steps}")
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            raise UsageError(f"{setting('epochs')} must be positive, got {self.epochs}")
        if self.time_budget is not None and not self.time_budget > 0:  # (nan is not > 0 either)
            raise UsageError(f"{setting('time_budget', flag='--time')} must be positive")
        if self.eval_interval is not None and not self.eval_interval > 0:
            raise UsageError(f"{setting('eval_interval')} must be positive (seconds), got {self.eval_interval}")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise UsageError(f"{setting('eval_steps')} must be positive, got {self.eval_steps}")
        if self.eval_interval is None and self.eval_steps is None:
            raise UsageError(f"validation needs {setting('eval_interval')} or {setting('eval_steps')}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UsageError(f"{setting(name)} must be 0 or more, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise UsageError(f"{setting('warmup_steps')} must be 0 or more, got {self.warmup_steps}")
        if self.optimizer not in ("adamw", "muon"):
            raise UsageError(f"{setting('optimizer')} must be adamw or muon, got {self.optimizer!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UsageError(f"{setting('dtype')} must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check_seed(self.seed)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


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

# Training tokens/s of each preset where it was measured (2-core Zen 4 CPU: compiled, bf16, averaged over
# 60 s (small) and 300 s (medium) runs, start-up and validation included; an H200:
# large with dropout, eager; medium over 15-20 s runs and small over 10-12 s ones, start-up included, as auto
# picks them only for those). Only used to guess how many times a run will pass over its text.
NOMINAL_TOKENS_PER_S = {"cpu": {"tiny": 60e3, "small": 24e3, "medium": 8.6e3, "large": 3e3},
                        "gpu": {"small": 6e4, "medium": 2e5, "large": 1e6},
                        "cpu-float32": {"small": 12e3, "medium": 4e3}}  # a 2-core AVX2 Zen 3: small 9-14K, medium 3.9K
# A CPU without native bf16 (AVX2 only, as most laptops) trains in float32 at a third to a quarter of the
# speed. On a 2-core AVX2 Zen 3 the 0.8M model won 5 minutes (1.483 against the 3.2M one's 1.661) and, in
# batches of 16, 1 minute (1.75-1.82 against batch 32's 1.96); in 10 minutes the 3.2M one scored 1.491 / 1.502
# and the 0.8M one, ending after its 6 passes over that roomy text at 7:12, 1.476 / 1.478; in 15 the 3.2M one
# scored 1.470 (README, "A CPU without bfloat16").
FLOAT32_CPU_MEDIUM_FROM = 900.0
FLOAT32_CPU_SHORT_BATCH = 16
# A GPU run's first step comes 7-12 s in (an H200): below these budgets a smaller model learns more in what is left
GPU_SHORT_BUDGETS = (("small", 12.0), ("medium", 20.0))
MANY_PASSES = 4.0  # beyond this many passes over the text, a model without dropout memorises it...
ROOMY_PASSES = 6.0  # ...unless the text has a character or more per hidden weight (see `is_roomy`)
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
    rather than memorising its text (README, "Small texts", has the measurements). A text with a
    character or more per hidden weight (`is_roomy`) gets no dropout and ROOMY_PASSES. `dropout`,
    `batch_size`, `block_size`, `n_layer` and `n_embd` are the user's, which the limits are fitted
    to. `float32_cpu`: the device is a CPU that trains in float32 (see `cpu_trains_in_float32`),
    several times slower.
    """
    if name not in PRESET_NAMES:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    given = {k: v for k, v in dict(dropout=dropout, batch_size=batch_size, block_size=block_size, n_layer=n_layer,
                                   n_embd=n_embd).items() if v is not None}
    if name != "auto":
        return dict(PRESETS[name], **given)
    short = time_budget is not None and time_budget < 240
    float32 = float32_cpu and not device.startswith("cuda")
    if device.startswith("cuda"):
        name = next((n for n, under in GPU_SHORT_BUDGETS if time_budget is not None and time_budget < under), "large")
    elif float32:
        name = "small" if time_budget is not None and time_budget < FLOAT32_CPU_MEDIUM_FROM else "medium"
    else:
        name = "small" if short else "medium"
    picked = {**PRESETS[name], **({"batch_size": FLOAT32_CPU_SHORT_BATCH} if float32 and short else {}), **given}
    if not train_chars:
        return picked
    speed = "gpu" if device.startswith("cuda") else "cpu-float32" if float32 else "cpu"
    roomy = is_roomy(picked, train_chars)
    many = not roomy and expected_passes(name, speed, picked, time_budget, max_steps, train_chars) > MANY_PASSES
    if many and dropout is None:
        picked["dropout"] = SMALL_DATA["dropout"]
    if max_steps is None:
        floor = MIN_STEPS * picked["batch_size"] * picked["block_size"] / train_chars
        if not picked.get("dropout"):
            picked["epochs"] = max(ROOMY_PASSES if roomy else MANY_PASSES, floor)
        elif many:
            picked["epochs"] = max(SMALL_DATA["epochs"], floor)
    return picked


def is_roomy(preset: dict, train_chars: int) -> bool:
    """Whether the text has a character or more per hidden weight: then auto adds no dropout, and a
    run ends after ROOMY_PASSES passes rather than MANY_PASSES.

    On tinyshakespeare (1M characters) the 0.8M model (0.79M hidden weights) scored 1.489 after 4
    passes and 1.478 after 6, and dropout 0.2 cost it more than it saved (1.585 after 4.6 passes,
    1.513 after 9); the 3.2M one (3.1M) was best at 3.5-5.3 passes (1.461-1.475) and read 1.506
    after 6.9. Small texts gain from dropout (README, "Small texts"). Bigger models on bigger texts
    (a GPU's) follow the same rule unmeasured."""
    return train_chars >= 12 * preset["n_layer"] * preset["n_embd"] ** 2  # attention 4 d², MLP 8 d², a layer


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
    ROOMY_PASSES over one with a character or more per hidden weight; a short text gets dropout and a
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
        if value is not None and not _is(value, kind):
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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|ms|m|s)?", re.IGNORECASE)
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}
_NEXT_UNIT = {"h": "m", "m": "s"}  # "1h30" means 1h30m, "5m30" means 5m30s


def parse_duration(text: str) -> float:
    """Seconds from `300`, `90s`, `5m`, `1h30m`, `1h30` or `1.5h`."""
    s = text.strip().replace(" ", "")
    if s.startswith("-") and s[1:2].isdigit():  # a readable duration, negated: say what is wrong with it
        parse_duration(s[1:])
        raise UsageError(f"--time must be positive, got {text!r}")
    pos, total, parts, last = 0, 0.0, 0, None
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if not m or m.end() == pos:
            break
        unit = m.group(2).lower() if m.group(2) else _NEXT_UNIT.get(last) if last else None
        if m.group(2) is None and m.end() != len(s):
            break
        if last is not None and (unit is None or list(_UNIT).index(unit) <= list(_UNIT).index(last)):  # 1h1h, 5s2m
            break
        total += float(m.group(1)) * _UNIT[unit]
        pos, parts, last = m.end(), parts + 1, unit
    if not s or pos != len(s) or parts == 0:
        raise UsageError(f"cannot read {text!r} as a duration; use seconds or e.g. 90s, 5m, 1h30m")
    if not total > 0:
        raise UsageError(f"--time must be positive, got {text!r}")
    return total


def with_overrides(obj, **changes):
    """`dataclasses.replace` that ignores None, so unset CLI flags keep the preset's value."""
    return replace(obj, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class SampleConfig:
    """Generation settings; the filters apply in llama.cpp's order (see `sampling.filter_logits`)."""

    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    compile: bool = False  # compile the decode step: pays off for small models and long generations
    dtype: str = "auto"  # the weights' precision while sampling (see sampling.decode_dtype)

    def __post_init__(self):
        if isinstance(self.stop, (str, list)):  # stop="\n\n" is one stop string, not one per character
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))

    def validate(self) -> SampleConfig:
        check_types(self)
        if self.max_new_tokens < 0:
            raise UsageError(f"{setting('max_new_tokens', flag='-n/--max-new-tokens')} must be >= 0, "
                             f"got {self.max_new_tokens}")
        if not (_float32(self.temperature) and self.temperature >= 0):
            raise UsageError(f"{setting('temperature')} must be a number from 0 to 3.4e38, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"{setting('top_k')} must be >= 0 (0: off), got {self.top_k}")
        for name in ("top_p", "min_p"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise UsageError(f"{setting(name)} must be in [0, 1], got {v}")
        if not (_float32(self.repeat_penalty) and self.repeat_penalty > 0):
            raise UsageError(f"{setting('repeat_penalty')} must be positive (at most 3.4e38), "
                             f"got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):  # (inf x a count of 0 is NaN: every logit lost)
            if not _float32(getattr(self, name)):
                raise UsageError(f"{setting(name)} must be a number within ±3.4e38 (float32's range), "
                                 f"got {getattr(self, name)}")
        if self.repeat_last_n < -1:
            raise UsageError(f"{setting('repeat_last_n')} must be >= -1 (-1: the whole context; 0: penalties off), "
                             f"got {self.repeat_last_n}")
        if self.num_samples <= 0:
            raise UsageError(f"{setting('num_samples')} must be positive, got {self.num_samples}")
        if any(not s for s in self.stop):
            raise UsageError(f"{setting('stop')} strings must not be empty")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise UsageError(f"{setting('dtype')} must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.seed is not None:
            check_seed(self.seed)
        return self


def cache_dir() -> Path:
    """Where tfcli keeps what it can rebuild (encoded corpora, compiled kernels): $TFCLI_CACHE, else
    $XDG_CACHE_HOME/tfcli, else ~/.cache/tfcli. The one place that reads them, so every cache agrees."""
    if os.environ.get("TFCLI_CACHE"):
        return Path(os.environ["TFCLI_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # (a relative one is to be ignored, says the XDG spec)
        return Path(xdg) / "tfcli"
    return home() / ".cache" / "tfcli"


def home() -> Path:
    """$HOME, else the account's home directory (Windows: the profile's): HOME="" made the cache
    ./.cache, wherever the command ran (at / it wrote to /.cache). Failing all, a directory of this
    process's own: never a shared one, where another user could plant the kernels tfcli loads."""
    if os.path.isabs(os.environ.get("HOME", "")):
        return Path(os.environ["HOME"])
    try:
        import pwd
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):  # (Windows; or no such account: a container's arbitrary uid)
        pass
    if os.path.isabs(profile := os.path.expanduser("~")):
        return Path(profile)
    import tempfile
    return Path(tempfile.mkdtemp(prefix="tfcli-"))


FLOAT32_MAX = 3.4028234663852886e38


def _float32(x: float) -> bool:
    """Finite as the float32 it is computed in: 1e39 passed as finite, became inf in the logits' dtype,
    and 0 * inf made NaN of every logit."""
    return math.isfinite(x) and abs(x) <= FLOAT32_MAX


def check_types(config) -> None:
    """Each field of a config dataclass holds its annotated type (an int where a float is asked is
    fine; a bool is not an int): a notebook's "1e-3" or 8.0 failed deep inside torch or numpy."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if not any(_is(value, kind) for kind in allowed):
            names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
            raise UsageError(f"{type(config).__name__}.{f.name} must be {names}, got {value!r}")


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(kind) or kind)
