"""`tfcli train`: read the text, pick the settings, hand the library's events to a dashboard.

Ctrl-C (or a closed stdout) lets the step end and the run save, then prints the command that
resumes it; the flags are checked before a large corpus is read.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from .. import stopping
from ..config import TrainConfig, parse_duration, with_overrides
from ..errors import TfcliError, UsageError, setting
from ..presets import DEFAULT_CPU_TIME, MANY_PASSES, MIN_STEPS, PRESET_NAMES, ROOMY_PASSES, SMALL_DATA
from .common import handle_errors, stderr, stdout, stop_writing_stdout


def process_age() -> float:
    """Seconds since this process started, so a --time budget counts interpreter and import time too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StopFlag(stopping.StopFlag):
    """The library's flag, with what a terminal user is told, and a closed stdout (`tfcli train | head`)
    treated as a first Ctrl-C whose exit code is a closed pipe's."""

    def __init__(self, quiet: bool = False, alone: bool = True):
        super().__init__(alone)
        self.reader_left = False
        self.quiet = quiet  # torchrun's other ranks: rank 0 speaks for them
        self.soon = None  # the view's way to show a line between its redraws, if it has one

    def __call__(self) -> bool:
        return super().__call__() or self.reader_left

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or (getattr(signal, "SIGPIPE", 13) if self.reader_left else signal.SIGINT))

    def stopping(self, signum: int) -> None:
        if not self.quiet:
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            message = f"stopping after this step ({again} again quits at once)…"
            if self.soon is not None:  # (a dashboard: shown above it when the step ends)
                self.soon(message)
            else:
                stderr.print("\n" + message, highlight=False)

    def reader_gone(self) -> None:
        """stdout's reader went away: stop and save as after Ctrl-C, rather than lose the run to the
        broken pipe."""
        stop_writing_stdout()
        if not self.reader_left and not self.quiet:
            stderr.print("output closed: stopping after this step…", highlight=False)
        self.reader_left = True

    def watching(self, view):
        """`view` as an event sink whose broken pipe stops the run instead of ending the process."""
        self.soon = getattr(view, "say_soon", None)
        def on_event(event) -> None:
            try:
                view(event)
            except BrokenPipeError:
                self.reader_gone()
        return on_event


def _parse_time(time_: str | None) -> float | None:
    return parse_duration(time_) if time_ is not None else None


@handle_errors
def train(
    corpus: list[Path] = typer.Argument(..., help="Text files, or directories of text files, to train on.",
                                        metavar="CORPUS", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory \\[default: runs/<corpus name>]."),
    val: Optional[list[Path]] = typer.Option(None, "--val", metavar="FILE",
                                             help="Validate on this file instead of the last 10%."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of the text held out for validation "
                                                 "\\[default: 0.1; none with --val]."),
    time_: Optional[str] = typer.Option(None, "--time", help="Wall-clock budget: 300, 90s, 5m, 1h30m "
                                        "\\[default: 5m, unless --max-steps or --epochs is given]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", "--max-iters",
                                            help="Stop after this many optimizer steps."),
    epochs: Optional[float] = typer.Option(None, help="Stop after this many passes over the training text "
                                           "\\[default with auto: 4 without dropout (6 on a text with half a "
                                           "character per weight); with it, 10 on a small text, else none; at "
                                           "least 200 steps]."),
    preset: str = typer.Option("auto", help=f"Model size: {', '.join(PRESET_NAMES)} "
                               "(auto: by device, --time and the text's size)."),
    n_layer: Optional[int] = typer.Option(None, help="Transformer blocks."),
    n_head: Optional[int] = typer.Option(None, help="Attention heads per block."),
    n_embd: Optional[int] = typer.Option(None, help="Width of the residual stream."),
    block_size: Optional[int] = typer.Option(None, help="Context length in characters."),
    dropout: Optional[float] = typer.Option(None, help="Dropout rate \\[default: 0.2 where auto sees a small text, "
                                            "else 0]."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per step."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per step: the same step in less memory "
                                             "\\[default: 1]."),
    lr: Optional[float] = typer.Option(None, "--lr", "--learning-rate",
                                       help="Peak learning rate \\[default: the preset's; 0.002 with "
                                       "--optimizer adamw]."),
    warmup_steps: Optional[int] = typer.Option(None, help="Steps of linear warmup \\[default: 30]."),
    weight_decay: Optional[float] = typer.Option(None, help="On the hidden matrices only \\[default: 0.1]."),
    grad_clip: Optional[float] = typer.Option(None, help="Clip the gradients' norm to this; 0: off \\[default: 1]."),
    seed: Optional[int] = typer.Option(None, help="Random seed (initialisation and batches) \\[default: 1337; "
                                       "a resumed run keeps its own]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16 (autocast precision)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the model \\[default: for runs of 3 minutes or "
                                                 "2,000 steps and more, where a compiler is found]."),
    eval_interval: Optional[float] = typer.Option(None, help="Seconds between validations \\[default: 30; "
                                                  "none when only --eval-steps is given]."),
    eval_steps: Optional[int] = typer.Option(None, help="...or steps between them, if sooner (nanoGPT's "
                                             "eval_interval) \\[default: 250]."),
    optimizer: Optional[str] = typer.Option(None, help="muon (Muon for hidden matrices + AdamW) or adamw."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out up to the budget now given."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the corpus files."),
    errors: str = typer.Option("strict", help="On undecodable bytes: strict (refuse) or replace."),
) -> None:
    """Train a model on CORPUS; progress live on a terminal, log lines in a pipe."""
    started_at = time.monotonic() - process_age()
    budget = _parse_time(time_)
    if budget is None and max_steps is None and epochs is None:
        budget = DEFAULT_CPU_TIME
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    if val and val_fraction is not None:
        raise UsageError("--val-fraction splits the corpus, and with --val all of it trains; give one of them")
    from dataclasses import replace

    from .. import checkpoint as ckpt
    from ..corpus import load_corpus
    from ..device import pick_device
    from ..presets import preset as preset_configs

    if out is not None and (blocker := _not_a_directory(out)) is not None:
        what = "a broken symbolic link" if blocker.is_symlink() else "a file"
        raise UsageError(f"--out {out} is {what}; give a directory for the run" if blocker == out else
                         f"--out {out}: {blocker} is {what}, so it cannot hold the run's directory")
    vocab, base_model, base_train = None, None, None
    if resume:
        run_dir, stored = _run_to_resume(out, corpus)
        vocab, base_model, base_train = stored.vocab, stored.config, _saved_settings(stored)
        _warn_of_settings_a_resume_ignores(preset, seed)
        seed = None  # (its generators' state is restored)
    elif out is None:
        run_dir = ckpt.default_run_dir(corpus)
    else:
        run_dir = out
        ckpt.refuse_finished_run(run_dir)  # (train() checks too, but only after the corpus is read)

    # flags that are wrong whatever the text: said before a large corpus is read, not after
    device_type = pick_device(device).type
    _check_shape(base_model or preset_configs(preset, device_type, budget, dtype=dtype or "auto")[0],
                 dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size), dropout,
                 "the resumed model" if base_model else f"--preset {preset}")
    tuning = dict(lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
                  eval_interval=eval_interval, eval_steps=eval_steps)
    with_overrides(TrainConfig(), batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
                   time_budget=budget, dtype=dtype, optimizer=optimizer, seed=seed, **tuning).validate()
    from ..distributed import World

    world = World.from_env()  # under torchrun: only rank 0 speaks
    if world.is_main:
        warn_val_in_corpus(val, corpus)
    data = load_corpus(corpus, val, 0.1 if val_fraction is None else val_fraction, encoding, errors, vocab=vocab)
    if world.is_main:
        print_corpus_report(corpus, data, val, replaced=errors == "replace")
    if base_model is None:
        base_model, base_train = preset_configs(preset, device_type, budget, len(data.train), max_steps,
                                                optimizer or TrainConfig.optimizer, dropout, batch_size, block_size,
                                                dtype or "auto", n_layer, n_embd)
        base_model = replace(base_model, vocab_size=len(data.vocab))
    model_cfg = with_overrides(base_model, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                               dropout=dropout).validate()
    if resume and world.is_main:
        _note_changed_settings(base_train, dict(batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                                                warmup_steps=warmup_steps, weight_decay=weight_decay,
                                                grad_clip=grad_clip))
    train_cfg = with_overrides(base_train, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, **tuning)
    if eval_steps is not None and eval_interval is None:  # (validation at the same steps whatever the speed)
        train_cfg = replace(train_cfg, eval_interval=None)
    train_cfg = with_overrides(train_cfg, seed=seed, device=device, dtype=dtype, compile=compile_,
                               optimizer=optimizer)
    # every limit comes from this command: a resumed run goes on to the limits given now, not its old ones
    limits = {"max_steps": max_steps, "time_budget": budget, **({"epochs": epochs} if resume else {})}
    train_cfg = TrainConfig(**{**train_cfg.to_dict(), **limits}).validate()

    from ..render.progress import LiveProgress, NullProgress, PlainProgress
    from ..trainer import train as run_training

    view = (NullProgress() if not world.is_main else
            LiveProgress(stdout, warnings=stderr) if stdout.is_terminal and not stdout.is_dumb_terminal  # (no redraws)
            else PlainProgress(stdout, warnings=stderr))
    try:
        with StopFlag(quiet=not world.is_main, alone=not world.is_distributed) as stop, view:
            done = run_training(data, model_cfg, train_cfg, run_dir, stop.watching(view), resume=resume,
                                should_stop=stop, started_at=started_at, world=world)
    except KeyboardInterrupt as e:  # a second Ctrl-C or SIGTERM, or one before the first step: say what is left
        if world.is_main and not (run_dir / ckpt.MODEL_FILE).is_file():  # (its type kept: SIGTERM's exits 143)
            raise type(e)("nothing was saved yet; run the same command to start again") from e
        if world.is_main and not stop.polled:  # (only rank 0 writes: another machine's directory tells nothing)
            raise type(e)(f"no step was taken; {run_dir} is as the last session saved it") from e
        raise
    if done.reason == "interrupted":
        if world.is_main:
            launcher = "torchrun ... -m tfcli train" if world.is_distributed else "tfcli train"
            args = resume_args(corpus, run_dir, val=val, val_fraction=val_fraction, encoding=encoding, errors=errors)
            stderr.print(f"checkpoint saved at step {done.step}; continue with:\n"
                         f"  {launcher} {args}{resume_limits(done, train_cfg)}",
                         highlight=False, markup=False)
        raise typer.Exit(stop.exit_code)
    if done.reason == "epochs" and epochs is None and world.is_main:  # a limit the user never asked for
        stderr.print(f"note: {auto_limit(train_cfg.epochs, model_cfg.dropout)}; --epochs N sets another",
                     highlight=False, markup=False)
    if stop():  # the run had ended (its final validation) when Ctrl-C came or the reader left: a shell
        raise typer.Exit(stop.exit_code)  # still learns of the signal, and a pipe's output was cut


def auto_limit(epochs: float, dropout: float) -> str:
    """What ended a run at the epoch limit `--preset auto` set, and why it set one."""
    if dropout and epochs > SMALL_DATA["epochs"] or not dropout and epochs not in (MANY_PASSES, ROOMY_PASSES):
        # (the floor: that many passes would be too few steps)
        passes = f"{epochs:{',.0f' if epochs >= 100 else '.3g'}}"  # (as the model line prints them)
        return f"it stopped at auto's limit of {passes} passes over this short text (at least {MIN_STEPS} steps)"
    if dropout:
        return f"it stopped at auto's limit of {epochs:g} passes over this small text"
    if epochs == ROOMY_PASSES:
        return (f"it stopped at auto's limit of {epochs:g} passes over the text, after which a model this size "
                "gained little on a text this long")
    return (f"it stopped at auto's limit of {epochs:g} passes over the text, after which a model without dropout "
            "learns it by heart")


def _run_to_resume(out: Path | None, corpus: list[Path]):
    """The run `--resume` goes on with (`--out`, else the text's latest: runs/poems-2 over runs/poems,
    named as the loaders do) and its checkpoint."""
    from .. import checkpoint as ckpt

    run_dir = out
    if run_dir is None:
        run_dir = ckpt.latest_run_of(corpus)
        stderr.print(f"using {run_dir}", style="dim", highlight=False, markup=False)
    if not (run_dir / ckpt.MODEL_FILE).exists():
        if left := ckpt.earlier_files(run_dir):
            raise UsageError(f"{run_dir}: no {ckpt.MODEL_FILE} to resume from (its {' and '.join(left)} are kept); "
                             "train into another --out")
        if ckpt.in_use(run_dir):  # (a training that has not saved yet)
            raise TfcliError(f"{run_dir} is in use by another tfcli train, which has not saved yet; wait for it")
        raise UsageError(f"{run_dir}: no run to resume there; drop --resume to start one")
    return run_dir, ckpt.load_checkpoint(ckpt.resolve_model_path(run_dir))


def _saved_settings(stored) -> TrainConfig:
    saved = {"optimizer": "adamw", **stored.summary.get("train", {})}  # (runs from before Muon: AdamW)
    return TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def _warn_of_settings_a_resume_ignores(preset: str, seed: int | None) -> None:
    """A resumed run keeps its model and its random state: --preset and --seed would change nothing."""
    if preset != "auto":
        stderr.print(f"warning: --preset {preset} does not apply to a resumed run, which keeps its model",
                     highlight=False, markup=False)
    if seed is not None:
        stderr.print(f"warning: --seed {seed} does not apply to a resumed run, which goes on with its own "
                     "random state", highlight=False, markup=False)


def _note_changed_settings(saved: TrainConfig, given: dict) -> None:
    """A resumed run takes the training flags given now over its own; said, since --seed is
    warned of, --optimizer and --dropout refused, and these went through without a word."""
    changed = [f"{setting(k, v)} (the run's {getattr(saved, k):g})" for k, v in given.items()
               if v is not None and v != getattr(saved, k)]
    if changed:
        stderr.print(f"note: the resumed run goes on with {', '.join(changed)}", highlight=False, markup=False)


def _check_shape(shape, given: dict, dropout: float | None, source: str) -> None:
    """The model flags checked against the shape they change, naming what the user did not type:
    "--n-head 4" came from the preset (or the resumed model)."""
    try:
        with_overrides(shape, **given, dropout=dropout).validate()
    except UsageError as e:
        unsaid = [setting(k, getattr(shape, k)) for k, v in given.items() if v is None]  # (as the message has them)
        implied = [flag for flag in unsaid if re.search(re.escape(flag) + r"\b", e.message)]
        raise UsageError(e.message + (f" ({', '.join(implied)} comes from {source}; give it too)" if implied
                                      else "")) from None


def _not_a_directory(out: Path) -> Path | None:
    """The first of `out` and its parents that is there (a broken link included), where it is not a
    directory: refused before the corpus is read (a --out under a file failed only when the run's
    directory was made). None where it cannot tell (a directory it may not search: the make says)."""
    try:
        found = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
        return None if found is None or found.is_dir() else found
    except OSError:
        return None


def _within(a: Path, b: Path) -> bool:
    """Whether the file or directory `a` is `b` or lies inside the directory `b`."""
    try:
        if a.is_file() and b.is_file():
            return os.path.samefile(a, b)
        return b.is_dir() and (a.resolve() == b.resolve() or b.resolve() in a.resolve().parents)
    except OSError:
        return False


def warn_val_in_corpus(val: list[Path] | None, corpus: list[Path]) -> None:
    """--val naming a training file scores text the model learns: validation would only go down.
    A corpus path given twice (or inside a directory given) is read twice: say so."""
    for v in val or []:
        if v.is_file() and any(_within(v, c) for c in corpus):
            stderr.print(f"warning: --val {v} is also training text, so its loss measures memory, not "
                         "generalisation", highlight=False, markup=False)
    for i, later in enumerate(corpus):
        first = next((c for c in corpus[:i] if _within(later, c) or _within(c, later)), None)
        if first is not None:
            stderr.print(f"warning: {later} repeats text already given ({first}): it is read twice, and validation "
                         "may hold text that also trains", highlight=False, markup=False)


def resume_args(corpus: list[Path], run_dir: Path, *, val: list[Path] | None, val_fraction: float | None,
                encoding: str, errors: str) -> str:
    """The corpus, run directory and text flags of a resume command: the corpus must be read as
    it was (the same split and decoding), or the resumed run is refused as another corpus.
    Shell-quoted, so the line can be pasted whatever the paths hold."""
    args = [*map(str, corpus), "--out", str(run_dir), "--resume"]
    for path in val or []:
        args += ["--val", str(path)]
    if val_fraction is not None:
        args += ["--val-fraction", repr(val_fraction)]  # all its digits: another split is another corpus
    if encoding != "utf-8":
        args += ["--encoding", encoding]
    if errors != "strict":
        args += ["--errors", errors]
    return shlex.join(args)


def resume_limits(done, cfg) -> str:
    """The flags that finish an interrupted run as it was set to run: the time it had left (a
    resumed run's schedule goes on from where it stopped), and its step and epoch limits, which
    count from the run's start (`auto` may have set the epochs)."""
    flags = f" --time {max(1, math.ceil(cfg.time_budget - done.elapsed))}s" if cfg.time_budget else ""
    flags += f" --max-steps {cfg.max_steps}" if cfg.max_steps else ""
    # (the float exactly, in its shortest form: auto's limit of 200 steps was 35.65459610027855 passes,
    # and 35.6546 made 201)
    short = f"{cfg.epochs:g}" if cfg.epochs else ""
    return flags + (f" --epochs {short if float(short) == cfg.epochs else repr(cfg.epochs)}" if cfg.epochs else "")


def print_corpus_report(paths: list[Path], data, val: list[Path] | None = None, replaced: bool = False) -> None:
    """`replaced`: --errors replace was given, so the text may hold U+FFFD for bytes that did not decode."""
    from ..render import plural

    def listed(ps: list[Path]) -> str:
        return ", ".join(str(p) for p in ps[:3]) + (f" and {len(ps) - 3} more" if len(ps) > 3 else "")

    if val:  # two texts: say which holds how much
        line = (f"corpus: {listed(paths)}: {plural(len(data.train), 'char')} to train on; validation: "
                f"{listed(val)}: {plural(len(data.val), 'char')}; vocab {len(data.vocab):,}")
    else:
        line = (f"corpus: {listed(paths)}: {plural(data.n_chars, 'char')}, vocab {len(data.vocab):,}; "
                f"train {len(data.train):,} / val {len(data.val):,}")
    stdout.print(line, highlight=False, markup=False)
    if data.uncached:
        stderr.print(f"note: the token cache in {data.uncached} cannot be written, so this corpus is encoded in "
                     "memory, again on every run (set TFCLI_CACHE to a writable directory)", highlight=False,
                     markup=False)
    if replaced and (count := data.count("\ufffd")):  # how much of the text was not text: a few bytes, or all
        stderr.print(f"note: {count:,} of the {plural(data.n_chars, 'char')} {'is' if count == 1 else 'are'} U+FFFD, "
                     "which --errors replace puts where bytes do not decode", highlight=False, markup=False)
    if data.skipped:
        more = f" and {len(data.skipped) - 3} more" if len(data.skipped) > 3 else ""
        from ..corpus import wide_text
        wide = next((p for p in data.skipped if wide_text(p)), None)
        hint = f" ({wide} is UTF-16/32 text: pass --encoding utf-16 or utf-32 to read such files)" if wide else ""
        stderr.print(f"note: skipped {plural(len(data.skipped), 'binary file')} found in the directories given: "
                     f"{', '.join(str(p) for p in data.skipped[:3])}{more}{hint}", highlight=False, markup=False)
