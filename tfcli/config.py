"""Configuration as frozen dataclasses (`presets` picks their values for a device and a budget).

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


def check_model(model, caller: str) -> None:
    """A model is what carries a ModelConfig (a GPT, or the C kernels' NativeModel): a notebook's
    `evaluate("runs/x", ids)` failed at `'str' object has no attribute 'config'`, and
    `attention("runs/x", ...)` said the model had no vocabulary."""
    if isinstance(getattr(model, "config", None), ModelConfig):
        return
    if isinstance(model, (str, os.PathLike)):
        raise UsageError(f"{caller} takes a model: model = tfcli.load({str(model)!r}) first, then "
                         f"{caller}(model, ...)")
    raise UsageError(f"{caller} takes a model (tfcli.load(path)), got a {type(model).__name__}")


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(hours?|hrs?|h|minutes?|mins?|ms|m|seconds?|secs?|s)?", re.IGNORECASE)
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, None: 1.0}
_NEXT_UNIT = {"h": "m", "m": "s"}  # "1h30" means 1h30m, "5m30" means 5m30s


def parse_duration(text: str) -> float:
    """Seconds from `300`, `90s`, `5m` (or `5min`), `1h30m`, `1h30` or `1.5h`."""
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
        unit = unit if unit in _UNIT else unit[0]  # (5min, 2hrs, 90seconds: "--time 5min" was refused)
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
        if not any(is_of_type(value, kind) for kind in allowed):
            names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in allowed)
            raise UsageError(f"{type(config).__name__}.{f.name} must be {names}, got {value!r}")


def is_of_type(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(kind) or kind)
