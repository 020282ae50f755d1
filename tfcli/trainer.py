"""The training loop. It never prints: it reports small event objects to a callback.

Choices that matter for speed on a CPU: batches are gathered straight from the
corpus's id array, in memory or memory-mapped (no DataLoader), bf16 autocast where
the CPU has native bf16, fused AdamW, no dropout by default, and validation on a
fixed sample at most every `eval_interval` seconds. The learning-rate schedule
(schedule.py) runs on whichever budget ends first, steps or wall clock: warmup, a
stable phase, then a 1 - sqrt cooldown. Under torchrun the processes train data-parallel (see distributed.py)
and only rank 0 reports events and writes the run directory.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import native
from .config import ModelConfig, SampleConfig, TrainConfig
from .corpus import Corpus, show_char, show_chars
from .device import autocast, compile_failure, compile_model, keep_freed_memory, pick_device, pick_dtype, should_compile
from .distributed import World, agree, first_differing, least, mean, process_group, wrap
from .errors import TfcliError, UsageError, setting, warn
from .evaluation import evaluate
from .events import Done, Eval, Event, Notice, Sample, Start, Step
from .memory import check_step_fits
from .model import GPT
from .optim import make_optimizer
from .sampling import generate
from .schedule import StepClock, lr_at, schedule_progress, step_limit, steps_to_repay_compile, validation_due
from .stopping import StopFlag
from .tokens import release

MIN_CONTEXT = 8  # below this a "language model" can only learn character frequencies
VAL_PIECES = 8  # a long val split is sampled as this many stretches spread across it


# -- pieces ------------------------------------------------------------------------------

def fit_context(cfg: ModelConfig, corpus: Corpus, on_event: Callable[[Event], None]) -> ModelConfig:
    """Shrink the context to fit a short corpus, or refuse a hopelessly short one."""
    limit = len(corpus.train) - 2
    if limit >= cfg.block_size:
        return cfg
    if limit < MIN_CONTEXT:
        n, held = len(corpus.train), len(corpus.val) if corpus.val_split else 0
        after = f" once {held:,} {'is' if held == 1 else 'are'} held out for validation" if held else ""
        hint = f"; {setting('val_fraction', 0)} holds none out" if held and n + held >= MIN_CONTEXT + 2 else ""
        raise UsageError(f"the training text has {n} character{'s' if n != 1 else ''}{after}: too short to train "
                         f"on (need at least {MIN_CONTEXT + 2}{hint})")
    on_event(Notice(f"the training text is shorter than the context; context shrunk to {limit:,}"))
    return replace(cfg, block_size=limit)


def get_batch(data: np.ndarray, batch_size: int, block_size: int, gen: torch.Generator, device,
              rows: slice = slice(None)):
    """Random windows of block_size+1 tokens, gathered from the id array (in memory or mapped).

    x is the window, y the window shifted by one. Every process draws the whole batch's starts
    and keeps its `rows`, so the generator's state, and a resumed run's, is the same everywhere.
    """
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=gen)[rows].numpy()
    chunk = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    release(data)  # a mapped corpus keeps only this batch's pages resident
    return chunk[:, :-1].to(device, non_blocking=True), chunk[:, 1:].to(device, non_blocking=True)


def val_sample(val: np.ndarray, n_tokens: int, pieces: int = VAL_PIECES) -> list[np.ndarray]:
    """The fixed text scored by validations during training: all of a short val split, else
    `pieces` stretches spread evenly across it, so its cost does not grow with the corpus."""
    if len(val) < 2:
        return []
    if len(val) <= n_tokens + 1:
        return [val]
    size = max(2, n_tokens // pieces + 1)
    return [val[s:s + size] for s in np.linspace(0, len(val) - size, pieces).astype(np.int64)]


class ValidationStopped(Exception):
    """A Ctrl-C during the final validation: it is cut short, and the run saved as interrupted."""


def val_loss(model: GPT, sample: list[np.ndarray], dtype: torch.dtype,
             should_stop: Callable[[], bool] = lambda: False) -> float | None:
    """Mean loss per character over the stretches of a validation sample; `should_stop` is asked
    between stretches."""
    results = []
    for piece in sample:
        if should_stop():
            raise ValidationStopped
        results.append(evaluate(model, piece, dtype=dtype))
    return sum(r.loss * r.chars for r in results) / sum(r.chars for r in results) if results else None


def grad_scaler(device: torch.device, dtype: torch.dtype):
    """A GradScaler for float16 (see train_step), else None."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def train_step(step_fn, model: GPT, opt, x, y, device, dtype, grad_clip: float, scaler=None,
               accum: int = 1) -> float:
    """One optimizer step; returns the loss. `step_fn` is the model, or its compiled form.

    With `accum` > 1 the batch goes through in that many equal micro-batches whose
    gradients add up to the whole batch's: the same step in a fraction of the activation
    memory. `scaler` (a GradScaler) is for float16, whose narrow range loses small
    gradients unless the loss is scaled up first; bf16 has fp32's range and needs none.
    """
    total = torch.zeros((), device=x.device)
    for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
        with autocast(device, dtype):
            _, loss = step_fn(xs, ys)
        loss = loss / accum
        (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach()
    if scaler is None:
        if grad_clip:  # (0: off, as in nanoGPT)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    else:
        for o in opt.optimizers:
            scaler.unscale_(o)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        for o in opt.optimizers:  # skipped, and the scale lowered, when a gradient overflowed
            scaler.step(o)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return total.item()


def config_hash(model_cfg: ModelConfig, corpus: Corpus) -> str:
    blob = json.dumps({"model": model_cfg.to_dict(), "corpus": corpus.digest, "vocab": corpus.vocab.chars})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def steps_digest(cfg: TrainConfig) -> str:
    """The settings every process of a torchrun job must share: a batch size or seed of its own would
    train on another share of another batch, silently, since DDP only needs the weights' shapes to
    agree. Not the device (each process drives its own GPU) nor whether it compiles (speed only)."""
    steps = {k: v for k, v in cfg.to_dict().items() if k not in ("device", "compile")}
    return hashlib.sha256(json.dumps(steps).encode()).hexdigest()[:16]


# -- resume state ---------------------------------------------------------------------------

def _state_tensors(model, opt, gen) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(opt.params()):
        for k, v in opt.state_of(p).items():
            tensors[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    return tensors


def _restore(tensors, model, opt, gen) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    device = next(model.parameters()).device
    for i, p in enumerate(opt.params()):
        state = {k.split(".", 2)[2]: v.to(device) for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.set_state(p, state)
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data"])


# -- the loop ----------------------------------------------------------------------------------

@dataclass
class _Run:
    """Mutable bookkeeping of one training run (what a checkpoint's summary records)."""
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # summed over resumed sessions
    progress: float = 0.0  # through the lr schedule: a resumed session goes on from here
    best_val: float | None = None
    best_step: int | None = None
    last_val: float | None = None
    val_step: int | None = None


def train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path,
          on_event: Callable[[Event], None] | None = None, resume: bool = False,
          should_stop: Callable[[], bool] | None = None, started_at: float | None = None,
          world: World | None = None) -> Done:
    """Train a model on `corpus` into `run_dir` and return how it ended.

    `started_at` (a time.monotonic() value) lets the wall-clock budget include the
    caller's start-up; `should_stop` is polled after every step (and validation), and when it
    says so the run saves and returns, its reason "interrupted". Without one, Ctrl-C (a notebook's
    interrupt) lets the step end and the run save, then raises KeyboardInterrupt as usual (see
    stopping.StopFlag).
    `world` places this process in a torchrun job (default: as torchrun's environment
    says); events reach `on_event` on rank 0 only. Without an `on_event`, its Notices (a context
    shrunk to the text, a step that takes minutes, no validation) are Python warnings.
    """
    started_at = time.monotonic() if started_at is None else started_at
    if not isinstance(run_dir, (str, os.PathLike)):  # (a notebook passes a string, or None: a TypeError of pathlib's)
        raise UsageError(f"train's run_dir must be a path (str or Path), got {run_dir!r}")
    run_dir = Path(run_dir)
    if not isinstance(corpus, Corpus):
        raise UsageError(f"train takes a Corpus (tfcli.load_corpus([path])), got {type(corpus).__name__}")
    if not isinstance(model_cfg, ModelConfig) or not isinstance(cfg, TrainConfig):
        raise UsageError("train takes a ModelConfig, then a TrainConfig (tfcli.preset() gives both)")
    cfg.validate()  # (the CLI's flags are checked already; a notebook's config is checked here)
    if len(corpus.vocab) < 2:  # (a file of newlines trained to a loss of 0.000 and sampled newlines)
        raise UsageError(f"the text holds one distinct character ({show_char(corpus.vocab.chars[0])}): there is "
                         "nothing for a model to learn")
    if cfg.max_steps is None and cfg.time_budget is None and cfg.epochs is None:
        raise UsageError(f"give a budget: {setting('time_budget', flag='--time')}, {setting('max_steps')} "
                         f"and/or {setting('epochs')}")
    world = World.from_env() if world is None else world
    world.share(cfg.batch_size)  # refuse an uneven split before joining the other processes
    keep_freed_memory()  # (16-25% faster CPU steps: see there)
    device = world.device(pick_device(cfg.device))
    if device.type == "cpu" and world.is_main:  # the samples at each validation decode through them
        native.prepare("decode_attention.c", "decode_matmul.c")
    lock = ckpt.run_lock(run_dir) if world.is_main else contextlib.nullcontext()
    flag = StopFlag(alone=not world.is_distributed) if should_stop is None else contextlib.nullcontext(should_stop)
    # the run seeds torch's generators (cfg.seed); the caller's (a notebook's) get their state back
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    on_event = (on_event or _warn_of_notices) if world.is_main else _ignore
    try:
        with process_group(world, device), lock, flag as should_stop, torch.random.fork_rng(devices=cuda):
            done = _train(corpus, model_cfg, cfg, run_dir, on_event, resume, should_stop, started_at, world, device)
    finally:
        gc.unfreeze()  # (the run froze what was alive at its third step: a notebook's objects get collected again)
    if done.reason == "interrupted" and isinstance(flag, StopFlag):  # (a loop of runs stops at one Ctrl-C)
        raise KeyboardInterrupt(f"training stopped at step {done.step} and saved in {run_dir}; "
                                "train(..., resume=True) goes on")
    return done


CPU_FLOPS = 100e9  # a laptop CPU's training rate, roughly (2 Zen 4 cores: ~250 GFLOP/s in bf16)
CPU_FLOPS_FLOAT32 = 50e9  # one without native bf16 (2 AVX2 Zen 3 cores: 17-100 GFLOP/s, the least at huge batches)
SLOW_STEP_S = 60.0
SLOW_FOR_BUDGET_S = 10.0  # ...or a step longer than the --time budget, when it is this long


def warn_slow_steps(model: GPT, batch_size: int, on_event: Callable[[Event], None], rate: float = CPU_FLOPS,
                    budget: float | None = None) -> None:
    """Say so when one step would take minutes, or outlast the budget: Ctrl-C and --time act between
    steps, so a context of 100K characters (attention costs its square) looked like a hang that
    ignored them, and --batch-size 20000 with --time 20 ran 3.4 minutes in silence (its one step)."""
    seconds = batch_size * model.config.block_size * model.flops_per_token() / rate
    over_budget = budget is not None and seconds > max(budget, SLOW_FOR_BUDGET_S)
    if seconds > SLOW_STEP_S or over_budget:
        span = f"{seconds / 60:,.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
        budget_flag = setting('time_budget', flag='--time')
        on_event(Notice(f"one step of this model is about {span} of CPU work (context {model.config.block_size:,}, "
                        f"batch {batch_size}){', longer than the time budget' if over_budget else ''}; Ctrl-C and "
                        f"{budget_flag} act between steps"))


def unseen_in_training(chars: list[str]) -> str:
    shown = show_chars(chars)
    return (f"the validation text has {len(chars)} character{'s' * (len(chars) != 1)} the training text lacks "
            f"({shown}): the model cannot learn them, and they raise its validation loss")


def _ignore(event: Event) -> None:
    pass


def _warn_of_notices(event: Event) -> None:
    """A notebook that passed no `on_event` still hears what changed its run: a context of 10**7
    shrunk to a 180K-character text made a first step of about an hour, and said so to nobody."""
    if isinstance(event, Notice):
        warn(event.message)


def _train(corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, on_event: Callable[[Event], None],
           resume: bool, should_stop: Callable[[], bool], started_at: float, world: World,
           device: torch.device) -> Done:
    session = _Session(corpus, model_cfg, cfg, run_dir, on_event, resume, should_stop, started_at, world, device)
    return session.finish(session.loop())


@dataclass
class _Window:
    """The steps since the display last showed one, whose mean loss and token rate it shows next."""
    start: float
    loss: float = 0.0
    steps: int = 0
    tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens

    def mean(self, otherwise: float) -> float:
        return self.loss / self.steps if self.steps else otherwise

    def rate(self, now: float) -> float:
        return self.tokens / max(now - self.start, 1e-9)

    def restart(self, now: float) -> None:
        self.loss, self.steps, self.tokens, self.start = 0.0, 0, 0, now


class _Session:
    """One call of `train`: the model, its optimizer and the run's bookkeeping, with this session's
    clock and limits (each resumed session has its own, and goes on from the run's step and schedule)."""

    def __init__(self, corpus: Corpus, model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path,
                 on_event: Callable[[Event], None], resume: bool, should_stop: Callable[[], bool],
                 started_at: float, world: World, device: torch.device):
        self.corpus, self.cfg, self.run_dir, self.on_event = corpus, cfg, run_dir, on_event
        self.should_stop, self.started_at, self.world, self.device = should_stop, started_at, world, device
        self.model_cfg = fit_context(replace(model_cfg, vocab_size=len(corpus.vocab)).validate(), corpus, on_event)
        self.dtype = pick_dtype(device, cfg.dtype)
        self.scaler = grad_scaler(device, self.dtype)
        torch.manual_seed(cfg.seed)
        self.model = GPT(self.model_cfg).to(device)
        self.opt = make_optimizer(self.model, cfg, device)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.chash = config_hash(self.model_cfg, corpus)
        if (rank := first_differing(world, device, self.chash)) is not None:
            raise UsageError(f"rank {rank}'s text or model settings differ from rank 0's: every process of a "
                             "torchrun job must read the same text, with the same flags")
        if (rank := first_differing(world, device, steps_digest(cfg))) is not None:
            raise UsageError(f"rank {rank}'s training settings differ from rank 0's: every process of a torchrun "
                             "job must take the same steps (--preset auto picks by each machine's CPU: on "
                             "machines of different kinds, name a preset)")
        self.run = _load_resume(run_dir, self.chash, self.model, self.opt, self.gen, cfg) if resume else _Run()
        self.rows = world.share(cfg.batch_size)
        if (self.rows.stop - self.rows.start) % cfg.grad_accum:
            raise UsageError(f"{setting('grad_accum', cfg.grad_accum)} does not split each process's "
                             f"{self.rows.stop - self.rows.start} sequences evenly; pick a divisor of it")
        if device.type == "cpu":  # (before the run directory: a run refused leaves nothing behind)
            check_step_fits(self.model_cfg, self.rows.stop - self.rows.start, cfg.grad_accum, self.model.num_params())
        if world.is_main:
            ckpt.make_run_dir(run_dir, fresh=not resume, resumed_at=self.run.step if resume else None)
        if device.type == "cpu":
            warn_slow_steps(self.model, cfg.batch_size, on_event,
                            CPU_FLOPS if self.dtype == torch.bfloat16 else CPU_FLOPS_FLOAT32, cfg.time_budget)
        self.val_ids = val_sample(corpus.val, cfg.eval_tokens)
        if not self.val_ids:
            why = "none held out" if len(corpus.val) == 0 else "too short"
            on_event(Notice(f"no validation text ({why}); training without validation"))
        elif unseen := corpus.val_only():
            on_event(Notice(unseen_in_training(unseen)))
        self.net = wrap(self.model, world, device)
        self.compiled = should_compile(device, cfg.compile, cfg.time_budget,
                                       steps_to_repay_compile(cfg, corpus, self.model_cfg, self.run.step, device))
        self.step_fn = compile_model(self.net) if self.compiled else self.net
        if cfg.compile and not self.compiled and device.type == "cpu":  # (asked for, so not dropped in silence)
            on_event(Notice("compiling was asked for, but torch.compile needs a C++ compiler on a CPU (g++, c++ or "
                            "clang++) and none was found; training uncompiled"))
        on_event(Start(run_dir, self.model.num_params(), self.model_cfg, cfg, str(device),
                       str(self.dtype).replace("torch.", ""), len(corpus.train), len(corpus.val), len(corpus.vocab),
                       self.run.step, self.compiled, world.size))
        self.logged: list[dict] = []  # steps' metrics not yet written
        self.train_loss, self.lr = float("nan"), 0.0  # (the display's last figures)
        self.window = _Window(start=0.0)  # (the loop starts it)
        self.start_step = self.last_eval_step = self.run.step  # this session's first step, and its last validation

    def save(self, reason: str) -> None:
        run = self.run
        summary = {"step": run.step, "tokens": run.tokens, "seconds": round(run.train_seconds, 1),
                   "progress": run.progress, "val_loss": run.last_val, "best_val_loss": run.best_val,
                   "best_step": run.best_step, "val_step": run.val_step,
                   "params": self.model.num_params(), "ended": reason, "config_hash": self.chash,
                   "train": self.cfg.to_dict(),
                   # what "auto" came to this session (train keeps the settings as given, for --resume)
                   "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                   "compiled": self.compiled, "processes": self.world.size}
        # state first: a run directory that holds a model always holds the state to --resume it
        ckpt.save_state(self.run_dir / ckpt.STATE_FILE, _state_tensors(self.model, self.opt, self.gen), summary)
        ckpt.save_model(self.run_dir / ckpt.MODEL_FILE, self.model, self.corpus.vocab, summary)

    def write_metrics(self) -> None:
        """The steps' records kept since the last write (a file opened per step slowed fast steps)."""
        ckpt.append_metrics(self.run_dir, *self.logged)
        self.logged.clear()

    def validate(self, train_loss: float, reason: str = "running") -> None:
        run, model = self.run, self.model
        # (the final one stops at a Ctrl-C: it was heard only after the validation and its sample)
        val = val_loss(model, self.val_ids, self.dtype, self.should_stop if reason != "running" else lambda: False)
        if val is not None and not math.isfinite(val):  # blown up by the last step: keep the last good save
            raise _diverged(f"validation loss is {val}", run.step, self.cfg, self.run_dir)
        best = val is not None and (run.best_val is None or val < run.best_val)
        run.last_val, run.val_step = val, run.step
        if best:
            run.best_val, run.best_step = val, run.step
        self.save(reason)
        if best:
            ckpt.save_model(self.run_dir / ckpt.BEST_FILE, model, self.corpus.vocab,
                            {"step": run.step, "val_loss": val})
        self.logged.append({"step": run.step, "val_loss": val,
                            "train_loss": train_loss if math.isfinite(train_loss) else None,
                            "elapsed": round(time.monotonic() - self.started_at, 2)})
        self.write_metrics()
        self.on_event(Eval(run.step, val, train_loss, best, time.monotonic() - self.started_at))
        if reason == "running" or not self.should_stop():
            text = "".join(p[0] for p in generate(model, self.corpus.vocab, "", SampleConfig(
                max_new_tokens=self.cfg.sample_chars, temperature=0.8, seed=run.step)))
            self.on_event(Sample(run.step, text))
        model.train()

    def set_lr(self, lr: float) -> None:
        self.lr = lr
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> tuple[float, int]:
        """One optimizer step: its loss (the processes' mean) and the tokens it read."""
        cfg, device = self.cfg, self.device
        x, y = get_batch(self.corpus.train, cfg.batch_size, self.model_cfg.block_size, self.gen, device, self.rows)
        try:
            loss = train_step(self.step_fn, self.model, self.opt, x, y, device, self.dtype, cfg.grad_clip,
                              self.scaler, cfg.grad_accum)
        except Exception as e:  # noqa: BLE001 - only torch.compile's own failures are caught
            if self.step_fn is self.net or (why := compile_failure(e)) is None:
                raise
            self.on_event(Notice(f"torch.compile could not build this model ({why}); training uncompiled"))
            self.step_fn, self.compiled = self.net, False  # (the summary saved says how the run really trained)
            self.opt.zero_grad(set_to_none=True)  # (whatever a backward got to before it failed)
            loss = train_step(self.step_fn, self.model, self.opt, x, y, device, self.dtype, cfg.grad_clip,
                              self.scaler, cfg.grad_accum)
        loss_value = mean(self.world, device, loss)
        if not math.isfinite(loss_value):
            raise _diverged(f"loss is {loss_value}", self.run.step + 1, cfg, self.run_dir)
        return loss_value, x.numel() * self.world.size

    def loop(self) -> str:
        """Steps until a limit or a stop; returns which ("steps", "epochs", "time" or "interrupted")."""
        run, cfg, world = self.run, self.cfg, self.world
        reserve = _final_reserve(self.model, self.val_ids, self.device)
        session_start = time.monotonic()
        prior_seconds, prior_progress = run.train_seconds, run.progress
        budget = least(world, self.device, cfg.time_budget - (session_start - self.started_at) - reserve) \
            if cfg.time_budget else None
        last_eval, start_step = session_start, run.step
        self.window = _Window(session_start)
        max_steps, limit = step_limit(cfg, len(self.corpus.train), self.model_cfg.block_size)
        steps_left = max_steps - start_step if max_steps else None
        if steps_left is not None and steps_left <= 0:
            self.on_event(Notice(f"the run is at step {start_step:,} already, at or past this session's step limit "
                                 f"({max_steps:,}): nothing to train"))
        stop, clock = False, StepClock(warms_up=self.compiled or self.device.type == "cuda")
        self.model.train()
        while True:
            elapsed, stop = agree(world, self.device, time.monotonic() - session_start, stop)
            if stop:
                return "interrupted"
            progress = run.progress = schedule_progress(prior_progress, elapsed, budget, run.step - start_step,
                                                        steps_left)
            if max_steps and run.step >= max_steps:
                return limit
            next_step = clock.next_step(elapsed, run.step - start_step)  # (kept up to date for validation_due too)
            if budget is not None and elapsed + next_step >= budget:
                if run.step == 0:  # (saved, an untrained model would pass for a trained one)
                    raise self.spent_before_first_step(reserve)
                return "time"  # (no step is begun that would end past the budget)
            self.set_lr(lr_at(progress, run.step, cfg))
            step_started = time.monotonic()
            loss, tokens = self.step()
            run.step += 1
            run.progress = schedule_progress(prior_progress, elapsed, budget, run.step - start_step, steps_left)
            stop = self.should_stop()  # (as soon as a step ends: from the first one's end, Ctrl-C waits for a save)
            run.tokens += tokens
            run.train_seconds = prior_seconds + time.monotonic() - session_start
            self.window.add(loss, tokens)
            if run.step == 3:
                gc.freeze()  # everything alive now lives for the whole run; spare the collector from walking it
            now = time.monotonic()
            self.report(loss, tokens, now - step_started, now, progress)
            last_step = max_steps is not None and run.step >= max_steps  # the final validation follows at once
            if world.is_main and not (last_step or stop) and validation_due(
                    now - last_eval, now - session_start, budget, cfg.eval_interval, run.step - self.last_eval_step,
                    cfg.eval_steps, max_steps - run.step if max_steps else None, clock.estimate):
                validated_at = time.monotonic()
                self.validate(self.window.mean(self.train_loss))
                last_eval, self.last_eval_step = time.monotonic(), run.step
                took = last_eval - validated_at
                self.window.start += took  # (tokens/s counts the steps' time, not the validation's)
                if budget is not None and took > reserve:  # (a loaded machine: keep what one really takes)
                    budget, reserve = budget - (took - reserve), took
                stop = self.should_stop()  # (a Ctrl-C during it stops here, not after one more step)

    def spent_before_first_step(self, reserve: float) -> UsageError:
        """`--time 0.5s` trained no step, then saved the untrained model as the run (the one `sample`
        takes next) and exited 0. Refused instead; a new run's directory, still empty, goes (`run_lock`)."""
        started = time.monotonic() - self.started_at
        return UsageError(f"{setting('time_budget', flag='--time')} ({self.cfg.time_budget:g} s) ran out before "
                          f"the first step: starting up took {started:.1f} s, and {reserve:.1f} s is kept for "
                          f"the final validation and save; give it more than {math.ceil(started + reserve)} s")

    def report(self, loss: float, tokens: int, step_s: float, now: float, progress: float) -> None:
        """The step's own figures into the metrics and, twice a second, the window's mean to the display."""
        if not self.world.is_main:
            return
        run, window = self.run, self.window
        # every step's own figures (two runs of one seed log the same losses, step by step), written a
        # window at a time: a file opened per step cost a GPU run's millisecond steps a few percent
        self.logged.append({"step": run.step, "loss": round(loss, 5), "lr": self.lr,
                            "tokens_per_s": round(tokens / max(step_s, 1e-9), 1),
                            "elapsed": round(now - self.started_at, 2)})
        if now - window.start >= 0.5 or run.step == self.start_step + 1:
            self.write_metrics()
            self.show_window(now, progress)

    def show_window(self, now: float, progress: float) -> None:
        """The steps since the last Step event as one, their mean loss the train loss shown from now on."""
        self.train_loss = self.window.mean(self.train_loss)
        self.on_event(Step(self.run.step, self.train_loss, self.lr, self.window.rate(now), now - self.started_at,
                           progress))
        self.window.restart(now)

    def finish(self, reason: str) -> Done:
        """The last save (with a final validation unless stopped, or just validated) and the Done event."""
        run = self.run
        if self.world.is_main:
            if self.window.steps:  # the last steps' figures, so the final validation shows beside its own step
                self.show_window(time.monotonic(), run.progress)
            if reason == "interrupted" or run.step > self.start_step or run.val_step != run.step:
                reason = self.save_at_end(reason)  # (else a resumed run with nothing left: saved and validated)
        done = Done(run.step, run.last_val, run.best_val, time.monotonic() - self.started_at, self.run_dir, reason,
                    run.best_step, run.val_step)
        self.on_event(done)
        return done

    def save_at_end(self, reason: str) -> str:
        """Ctrl-C saves and goes at once (validation comes with the next session's steps), as does a run
        whose budget ran out just after a validation (the same model needs no second one); others
        validate, which saves. Returns the reason the run ended, "interrupted" if a Ctrl-C cut its
        final validation short."""
        just_validated = self.last_eval_step == self.run.step > self.start_step
        if reason != "interrupted" and not just_validated:
            try:
                self.validate(self.train_loss, reason)
                return reason
            except ValidationStopped:
                reason = "interrupted"
        self.write_metrics()
        self.save(reason)
        return reason


def _diverged(what: str, step: int, cfg: TrainConfig, run_dir: Path) -> TfcliError:
    kept = f"; the last good checkpoint in {run_dir} is kept" if (run_dir / ckpt.MODEL_FILE).exists() else ""
    return TfcliError(f"training diverged: {what} at step {step}; lower {setting('lr')} (now {cfg.lr:g}){kept}")


RESERVE_S_PER_PARAM_TOKEN = {"cpu": 3e-11, "cuda": 3e-13}  # a validation's forward pass, with room to spare


def _final_reserve(model: GPT, val_ids: list[np.ndarray], device: torch.device) -> float:
    """Seconds to keep for the final validation and save, so --time is the whole run's length: an
    estimate, raised to what a validation took if one took longer (on a busy host, 15x longer).
    A GPU's is far less than a CPU's: kept at the CPU's 5.7 s for the 10.7M model, an H200's run
    of `--time 15` (7-8 s of it starting up) had no time left for a single step."""
    rate = RESERVE_S_PER_PARAM_TOKEN["cuda" if device.type == "cuda" else "cpu"]
    return 0.5 + rate * model.num_params() * sum(len(piece) for piece in val_ids)


def _what_differs(run_dir: Path, asked: ModelConfig) -> str:
    """The model settings that differ from the run's (' (--n-layer 3, the run's 2)', or n_layer=3 in
    Python), or that they match and so the text must differ."""
    try:
        stored = ckpt.load_checkpoint(run_dir / ckpt.MODEL_FILE)
    except TfcliError:
        return ""
    saved = stored.config
    changed = [f"{setting(k, v)}, the run's {getattr(saved, k)}" for k, v in asked.to_dict().items()
               if k != "vocab_size" and getattr(saved, k) != v]
    if changed:
        return f" ({'; '.join(changed)})"
    if "\r" in stored.vocab.chars:  # (a run from before tfcli read \r\n and \r as \n)
        return (" (its model settings match, and it learnt \\r as a character: tfcli now reads line ends as \\n, "
                "so its text reads as another)")
    return (f" (its model settings match: the training text is another, or the same text split another way: "
            f"{setting('val_paths', flag='--val')} and {setting('val_fraction')} as the run had them)")


def _load_resume(run_dir: Path, chash: str, model, opt, gen, cfg: TrainConfig) -> _Run:
    state_path = run_dir / ckpt.STATE_FILE
    if not state_path.is_file():
        if (run_dir / ckpt.MODEL_FILE).is_file():
            raise UsageError(f"{run_dir}: its model has no {ckpt.STATE_FILE} to resume from; train into a new "
                             f"{setting('run_dir', flag='--out')}")
        raise UsageError(f"{run_dir}: nothing to resume (no {ckpt.STATE_FILE}); drop {setting('resume', True)} "
                         "to start a new run")
    tensors, state = ckpt.load_state(state_path)
    if state.get("config_hash") != chash:
        raise UsageError(f"{run_dir}: the corpus or model settings differ from the run being resumed"
                         f"{_what_differs(run_dir, model.config)}; resume with the same corpus and sizes, "
                         f"or train into a new {setting('run_dir', flag='--out')}")
    saved = state.get("train", {}).get("optimizer", "adamw")  # (runs from before Muon had no choice)
    if saved != cfg.optimizer:  # its saved moments are that optimizer's, and only its
        raise UsageError(f"{run_dir}: this run trains with {setting('optimizer', saved)}, and a resumed run keeps it "
                         f"(asked: {setting('optimizer', cfg.optimizer)})")
    _restore(tensors, model, opt, gen)
    # a best scored on another validation slice (runs from before eval_tokens was 16K scored 32K
    # characters) is no yardstick: the first validation after resuming sets a new one
    same_slice = state.get("train", {}).get("eval_tokens") == cfg.eval_tokens
    return _Run(step=state["step"], tokens=state["tokens"], train_seconds=state["seconds"],
                progress=state.get("progress", 0.0),  # (runs saved before it was recorded: from the start)
                best_val=state.get("best_val_loss") if same_slice else None,
                best_step=state.get("best_step") if same_slice else None, last_val=state.get("val_loss"),
                # (runs saved before val_step was recorded always validated at the step they saved)
                val_step=state.get("val_step", state["step"] if state.get("val_loss") is not None else None))
