"""The `tfcli` command: parse options, call the library, hand results to a renderer.

Nothing heavy is imported at module level, so `tfcli --help` answers without
loading torch. Every `TfcliError` becomes one line on stderr and its exit code;
an unexpected exception does too, unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from . import stopping
from .config import DEFAULT_CPU_TIME, PRESET_NAMES, SampleConfig, TrainConfig, parse_duration, with_overrides
from .errors import INTERRUPTED, USAGE, TfcliError, UsageError


def _no_value_shown_for_flags() -> None:
    """Typer 0.29's help gave an on/off flag a value placeholder (`--json <bool>`), as if it took one."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None:
        TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)


_no_value_shown_for_flags()
app = typer.Typer(name="tfcli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train a character-level transformer on any text, sample from it, and look inside it.")


class QuietConsole(Console):
    """A Console that treats a closed pipe (`| head`) as the reader being done, not as an error."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


stdout = QuietConsole(highlight=False, soft_wrap=True)
class DiagnosticsConsole(Console):
    """stderr: where no reader (`2>&1 | head`) means there is no one to tell, not a new failure."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


stderr = DiagnosticsConsole(stderr=True, highlight=False, soft_wrap=True)
_debug = False

MODEL_HELP = "Run directory or .safetensors file (default: the latest run under ./runs)."


def process_age() -> float:
    """Seconds since this process started, so a --time budget counts interpreter and import time too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def torchrun_rank() -> str:
    """This process's rank under torchrun ("0" alone, or outside it), read here rather than by
    distributed.World, which would import torch for an error message."""
    return os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"


QUIET_RANK_WAIT_S = 1.0


def quiet_exit_delay() -> None:
    """A rank that leaves rank 0 to say the error waits a moment first: torchrun stops every process
    once one exits, and could cut rank 0 off before it has said it."""
    time.sleep(QUIET_RANK_WAIT_S)


def fail(message: str, code: int) -> None:
    """One error line, and the exit. Under torchrun a usage error is every process's (the same flags),
    so only rank 0 says it; other errors say which rank met them."""
    rank = torchrun_rank()
    if rank != "0" and code == USAGE:
        quiet_exit_delay()
        raise typer.Exit(code)
    where = f"rank {rank}: " if rank != "0" else ""
    stderr.print(Text.assemble(("error:", "bold red"), " ", where + message.replace("\n", " ")), soft_wrap=True)
    raise typer.Exit(code)


def stop_writing_stdout() -> None:
    """The reader went away: point fd 1 at /dev/null so the exit-time flush cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner, a closed stream)
        pass


def handle_errors(fn=None, *, builds: tuple[str, ...] = (), torch: bool = True):
    """One line and an exit code for every failure a user can cause; a traceback only with --debug.
    `builds`: tfcli's C sources the command uses, built while torch imports (see import_whole).
    `torch=False`: a command that imports torch only if it needs it (`sample`, on a CPU)."""
    if fn is None:
        return functools.partial(handle_errors, builds=builds, torch=torch)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        term = stopping.TermAsInterrupt()
        try:
            with term:
                import_whole(builds, "torch" if torch else "safetensors.numpy")
                return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except TfcliError as e:
            fail(e.message, e.exit_code)
        except KeyboardInterrupt as e:  # (sample re-raises a plain one once it has shown its text)
            if term.received or isinstance(e, stopping.Terminated):
                fail("terminated", 128 + signal.SIGTERM)
            fail("interrupted", INTERRUPTED)
        except BrokenPipeError:
            stop_writing_stdout()
            raise typer.Exit(0) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if _debug:
                raise
            if (short := out_of_memory(e)) is not None:
                less = {"sample": "fewer --num-samples, or a smaller model", "eval_": "a smaller --batch-size",
                        "train": "a smaller --batch-size or model", "bench": "fewer --shape"}
                fail(f"out of memory: {short}; ask for less ({less.get(fn.__name__, 'a smaller model')})", 1)
            fail(f"{type(e).__name__}: {e} (rerun as 'tfcli --debug ...' for the traceback)", 1)
    return wrapper


def out_of_memory(e: BaseException) -> str | None:
    """What could not be allocated, where `e` is an allocator's refusal (numpy's MemoryError,
    PyTorch's CPU or GPU allocator), in words; else None. PyTorch's own message named a C++ source
    line and a byte count of eleven digits."""
    text = str(e).splitlines()[0] if str(e) else ""
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (a GPU's memory, usually)
        return text.split(". ")[0]
    if not isinstance(e, MemoryError) and not (isinstance(e, RuntimeError) and "can't allocate memory" in text):
        return None
    if (n := re.search(r"allocate (\d+) bytes", text)) is not None:
        return f"could not allocate {int(n.group(1)) / 2**30:.1f} GiB"
    return "could not allocate " + (text.removeprefix("Unable to allocate ") or "memory")


def import_whole(builds: tuple[str, ...] = (), module: str = "torch") -> None:
    """Import torch (and numpy with it) before a command runs, with Ctrl-C and SIGTERM held until
    it is done. A signal in the middle of those imports left modules half made, and the command
    failed later with a baffling `AttributeError: module 'numpy' has no attribute ...`. A signal
    that arrived meanwhile is delivered once the import ends: 'interrupted', exit 130. `module`:
    another to import so instead (numpy's safetensors, for a `sample` that may not need torch).

    `builds` start first, in threads that inherit the held signals (so none lands in them): a
    first-ever `tfcli sample` compiles its C kernels while torch imports, not after."""
    import importlib

    from . import native

    if module in sys.modules or "torch" in sys.modules or not hasattr(signal, "pthread_sigmask"):
        native.prepare(*builds)
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        native.prepare(*builds)
        importlib.import_module(module)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def print_version(asked: bool) -> None:
    """Eager, so `tfcli --version` needs no command after it."""
    if asked:
        from importlib.metadata import version as v
        print(f"tfcli {v('tfcli')}")
        raise typer.Exit(0)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
         version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                      callback=print_version, is_eager=True)) -> None:
    global _debug
    _debug = debug


# -- train ---------------------------------------------------------------------------------

class StopFlag(stopping.StopFlag):
    """The library's flag, with what a terminal user is told, and a closed stdout (`tfcli train | head`)
    treated as a first Ctrl-C whose exit code is a closed pipe's."""

    def __init__(self, quiet: bool = False, alone: bool = True):
        super().__init__(alone)
        self.reader_left = False
        self.quiet = quiet  # torchrun's other ranks: rank 0 speaks for them

    def __call__(self) -> bool:
        return super().__call__() or self.reader_left

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or (getattr(signal, "SIGPIPE", 13) if self.reader_left else signal.SIGINT))

    def stopping(self, signum: int) -> None:
        if not self.quiet:
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            stderr.print(f"\nstopping after this step ({again} again quits at once)…", highlight=False)

    def reader_gone(self) -> None:
        """stdout's reader went away: stop and save as after Ctrl-C, rather than lose the run to the
        broken pipe."""
        stop_writing_stdout()
        if not self.reader_left and not self.quiet:
            stderr.print("output closed: stopping after this step…", highlight=False)
        self.reader_left = True

    def watching(self, view):
        """`view` as an event sink whose broken pipe stops the run instead of ending the process."""
        def on_event(event) -> None:
            try:
                view(event)
            except BrokenPipeError:
                self.reader_gone()
        return on_event


def _parse_time(time_: str | None) -> float | None:
    return parse_duration(time_) if time_ is not None else None


@app.command()
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
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps."),
    epochs: Optional[float] = typer.Option(None, help="Stop after this many passes over the training text "
                                           "\\[default: 10 where auto sees a small text, else none]."),
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
    lr: Optional[float] = typer.Option(None, help="Peak learning rate \\[default: the preset's; 0.002 with "
                                       "--optimizer adamw]."),
    seed: Optional[int] = typer.Option(None, help="Random seed (initialisation and batches) \\[default: 1337; "
                                       "a resumed run keeps its own]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16 (autocast precision)."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the model \\[default: for runs of 3 minutes or "
                                                 "2,000 steps and more, where a compiler is found]."),
    eval_interval: Optional[float] = typer.Option(None, help="Seconds between validations \\[default: 30]."),
    eval_steps: Optional[int] = typer.Option(None, help="...or steps between them, if sooner \\[default: 250]."),
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

    from . import checkpoint as ckpt
    from .config import preset as preset_configs
    from .corpus import load_corpus
    from .device import pick_device

    run_dir, vocab, base_model, base_train = out, None, None, None
    if run_dir is not None and run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run")
    if resume:
        if run_dir is None:  # the text's latest run (runs/poems-2 over runs/poems), named as the loaders do
            run_dir = ckpt.latest_run_of(corpus)
            stderr.print(f"using {run_dir}", style="dim", highlight=False, markup=False)
        stored = ckpt.load_checkpoint(ckpt.resolve_model_path(run_dir)) if (run_dir / ckpt.MODEL_FILE).exists() \
            else None
        if stored is None:
            raise UsageError(f"{run_dir}: no run to resume there; drop --resume to start one")
        vocab, base_model = stored.vocab, stored.config
        if preset != "auto":
            stderr.print(f"warning: --preset {preset} does not apply to a resumed run, which keeps its model",
                         highlight=False, markup=False)
        if seed is not None:  # (its generators' state is restored: a new seed would change nothing)
            stderr.print(f"warning: --seed {seed} does not apply to a resumed run, which goes on with its own "
                         "random state", highlight=False, markup=False)
            seed = None
        saved = {"optimizer": "adamw", **stored.summary.get("train", {})}  # (runs from before Muon: AdamW)
        base_train = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
    elif run_dir is None:
        run_dir = ckpt.default_run_dir(corpus)
    else:
        ckpt.refuse_finished_run(run_dir)  # (train() checks too, but only after the corpus is read)

    # flags that are wrong whatever the text: said before a large corpus is read, not after
    device_type = pick_device(device).type
    shape = base_model or preset_configs(preset, device_type, budget)[0]
    given = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
    try:
        with_overrides(shape, **given, dropout=dropout).validate()
    except UsageError as e:  # name what the user did not type: "--n-head (4)" came from the preset
        implied = [f"--{k.replace('_', '-')} {getattr(shape, k)}" for k, v in given.items()
                   if v is None and f"--{k.replace('_', '-')} (" in e.message]
        source = "the resumed model" if base_model else f"--preset {preset}"
        raise UsageError(e.message + (f" ({', '.join(implied)} comes from {source}; give it too)" if implied
                                      else "")) from None
    with_overrides(TrainConfig(), batch_size=batch_size, lr=lr, eval_interval=eval_interval, eval_steps=eval_steps,
                   grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, time_budget=budget, dtype=dtype,
                   optimizer=optimizer, seed=seed).validate()
    from .distributed import World

    world = World.from_env()  # under torchrun: only rank 0 speaks
    if world.is_main:
        warn_val_in_corpus(val, corpus)
    data = load_corpus(corpus, val, 0.1 if val_fraction is None else val_fraction, encoding, errors, vocab=vocab)
    if world.is_main:
        print_corpus_report(corpus, data, val)
    if base_model is None:
        base_model, base_train = preset_configs(preset, device_type, budget, len(data.train), max_steps,
                                                optimizer or TrainConfig.optimizer)
        base_model = replace(base_model, vocab_size=len(data.vocab))
    model_cfg = with_overrides(base_model, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                               dropout=dropout).validate()
    train_cfg = with_overrides(base_train, batch_size=batch_size, lr=lr, eval_interval=eval_interval,
                               eval_steps=eval_steps, grad_accum=grad_accum, epochs=epochs)
    train_cfg = with_overrides(train_cfg, seed=seed, device=device, dtype=dtype, compile=compile_,
                               optimizer=optimizer)
    # every limit comes from this command: a resumed run goes on to the limits given now, not its old ones
    limits = {"max_steps": max_steps, "time_budget": budget, **({"epochs": epochs} if resume else {})}
    train_cfg = TrainConfig(**{**train_cfg.to_dict(), **limits}).validate()

    from .render.progress import LiveProgress, NullProgress, PlainProgress
    from .trainer import train as run_training

    view = (NullProgress() if not world.is_main else
            LiveProgress(stdout, warnings=stderr) if stdout.is_terminal else PlainProgress(stdout, warnings=stderr))
    try:
        with StopFlag(quiet=not world.is_main, alone=not world.is_distributed) as stop, view:
            done = run_training(data, model_cfg, train_cfg, run_dir, stop.watching(view), resume=resume,
                                should_stop=stop, started_at=started_at, world=world)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step: say what is left
        if world.is_main and not (run_dir / ckpt.MODEL_FILE).is_file():
            stderr.print("\nstopped before anything was saved: start it again, without --resume", highlight=False)
        elif world.is_main and not stop.polled:
            stderr.print(f"\nstopped before a step: {run_dir} is as the last session saved it", highlight=False)
        raise
    if done.reason == "interrupted":
        if world.is_main:
            launcher = "torchrun ... -m tfcli train" if world.is_distributed else "tfcli train"
            args = resume_args(corpus, run_dir, val=val, val_fraction=val_fraction, encoding=encoding, errors=errors)
            stderr.print(f"checkpoint saved at step {done.step}; continue with:\n"
                         f"  {launcher} {args}{resume_limits(done, train_cfg)}",
                         highlight=False, markup=False)
        raise typer.Exit(stop.exit_code)
    if stop():  # the run had ended (its final validation) when Ctrl-C came or the reader left: a shell
        raise typer.Exit(stop.exit_code)  # still learns of the signal, and a pipe's output was cut


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
    count from the run's start (`auto` may have set the epochs for a small text)."""
    flags = f" --time {max(1, math.ceil(cfg.time_budget - done.elapsed))}s" if cfg.time_budget else ""
    flags += f" --max-steps {cfg.max_steps}" if cfg.max_steps else ""
    # (the float exactly, in its shortest form: auto's limit of 200 steps was 35.65459610027855 passes,
    # and 35.6546 made 201)
    short = f"{cfg.epochs:g}" if cfg.epochs else ""
    return flags + (f" --epochs {short if float(short) == cfg.epochs else repr(cfg.epochs)}" if cfg.epochs else "")


def print_corpus_report(paths: list[Path], data, val: list[Path] | None = None) -> None:
    from .render import plural

    def listed(ps: list[Path]) -> str:
        return ", ".join(str(p) for p in ps[:3]) + (f" and {len(ps) - 3} more" if len(ps) > 3 else "")

    if val:  # two texts: say which holds how much
        line = (f"corpus: {listed(paths)}: {plural(len(data.train), 'char')} to train on; validation: "
                f"{listed(val)}: {plural(len(data.val), 'char')}; vocab {len(data.vocab)}")
    else:
        line = (f"corpus: {listed(paths)}: {plural(data.n_chars, 'char')}, vocab {len(data.vocab)}; "
                f"train {len(data.train):,} / val {len(data.val):,}")
    stdout.print(line, highlight=False, markup=False)
    if data.skipped:
        more = f" and {len(data.skipped) - 3} more" if len(data.skipped) > 3 else ""
        from .corpus import wide_text
        wide = next((p for p in data.skipped if wide_text(p)), None)
        hint = f" ({wide} is UTF-16/32 text: pass --encoding utf-16 or utf-32 to read such files)" if wide else ""
        stderr.print(f"note: skipped {plural(len(data.skipped), 'binary file')} found in the directories given: "
                     f"{', '.join(str(p) for p in data.skipped[:3])}{more}{hint}", highlight=False, markup=False)


# -- sample --------------------------------------------------------------------------------

def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            return read_stdin()
        try:  # line ends as written: the vocabulary decides how \r reads (`Vocab.spelt_as_known`), as on stdin
            with prompt_file.open(encoding="utf-8-sig", newline="") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{prompt_file}: cannot read prompt ({getattr(e, 'strerror', None) or e})") from None
    if prompt == "-":
        return read_stdin()
    return prompt or ""


def stdin_hint(what: str) -> None:
    """`-` with nothing piped in waits for the keyboard: say so, or it looks hung."""
    if sys.stdin.isatty():
        stderr.print(f"reading {what} from the terminal: type it, then Ctrl-D on a line of its own", style="dim",
                     highlight=False)


def read_stdin() -> str:
    """The prompt piped in; bytes that are not UTF-8 are said to be so (Python hands them on as
    lone surrogates, which read as characters the model never saw)."""
    stdin_hint("the prompt")
    try:
        text = sys.stdin.read().removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise UsageError("the prompt on stdin is not valid UTF-8") from None
    if any("\udc80" <= c <= "\udcff" for c in text):
        raise UsageError("the prompt on stdin is not valid UTF-8")
    return text


def fit_prompt(vocab, prompt: str, unknown: str, hint: str = "") -> str:
    """Apply the --unknown policy (Vocab.fit), warning on stderr of what it dropped or replaced."""
    escape = typed_escape(prompt, vocab)
    try:
        prompt, changed = vocab.fit(prompt, unknown)
    except UsageError as e:
        raise UsageError(e.message + (escape or hint)) from None
    if not changed:
        return prompt
    from .corpus import show_char
    if unknown == "skip":
        stderr.print(f"warning: dropped unknown characters: {' '.join(show_char(c) for c in changed)}{escape}",
                     markup=False)
    else:
        stderr.print("warning: replaced unknown characters: " + ", ".join(
            f"{show_char(c)}→{show_char(r) if r else '(dropped)'}" for c, r in changed.items()) + escape,
            markup=False)
    return prompt


def say_which(asked: Path | None, found: Path) -> None:
    """Where tfcli chose the run (no -m, or -m naming a directory of runs), say which on stderr."""
    if asked is None or (asked.is_dir() and found.parent.resolve() != asked.resolve()):
        stderr.print(f"using {found.parent}", style="dim", highlight=False, markup=False)


def load(model_path: Path | None, device: str = "cpu"):
    from .checkpoint import load_model
    import_whole()  # (for a command that held off: see load_sampler)
    model = load_model(model_path, device)
    say_which(model_path, model.path)
    return model


def load_sampler(model_path: Path | None, device: str, cfg: SampleConfig):
    """The model `sample` decodes with: on a CPU where tfcli's C kernels take the step, read
    without PyTorch (`native_decoder.NativeModel`: the first character came 0.5 s after enter
    rather than 2.5 s, most of it `import torch`), else PyTorch's."""
    from . import native_decoder
    from .sampling import decode_dtype

    if device != "cpu" or cfg.num_samples > native_decoder.MANY_ROWS or not native_decoder.kinds():
        return load(model_path, device)
    model = load_native(model_path, say=False)
    if not native_decoder.runs(decode_dtype(model, cfg.num_samples, cfg.dtype), cfg.num_samples):
        model = load(model.path, device)  # (the path found: say which, below)
    say_which(model_path, model.path)
    return model


def load_native(model_path: Path | None, say: bool = True):
    """The checkpoint read without PyTorch (`native_decoder.NativeModel`), checked as `load` checks it."""
    from .native_decoder import NativeModel
    model = NativeModel.load(model_path)
    if say:
        say_which(model_path, model.path)
    return model


@app.command()
@handle_errors(builds=("decode_attention.c", "decode_matmul.c"), torch=False)  # (the kernels sampling uses)
def sample(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to continue ('-': read stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from a file ('-': stdin)."),
    max_new_tokens: int = typer.Option(500, "--max-new-tokens", "-n", help="Characters to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "--temp", help="0 = greedy (argmax)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely characters (0: off, as in llama.cpp)."),
    top_p: Optional[float] = typer.Option(None, help="Keep the smallest set with this much probability."),
    min_p: Optional[float] = typer.Option(None, help="Drop characters below min-p times the top probability."),
    repeat_penalty: float = typer.Option(1.0, help="Penalise characters seen in the last --repeat-last-n."),
    repeat_last_n: int = typer.Option(64, help="How far back the penalties look (-1: the whole context; "
                                      "0: penalties off)."),
    presence_penalty: float = typer.Option(0.0, help="Subtract once from every recently seen character."),
    frequency_penalty: float = typer.Option(0.0, help="Subtract per recent occurrence."),
    seed: Optional[int] = typer.Option(None, help="Random seed; -1 as in llama.cpp: random \\[default: random, "
                                       "printed unless greedy]."),
    num_samples: int = typer.Option(1, help="Samples to generate, as one batch."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", metavar="STR",
                                             help="Stop at this string (repeatable; not printed; with -i: kept)."),
    unknown: str = typer.Option("error", help="Unknown prompt characters: error, skip (drop them) or replace "
                                "(by the closest known one: other case, no accent, ' for ’, - for –)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print characters as they come."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per sample: prompt, text, seed, "
                                 "index (in the batch), finish_reason (stop, length or interrupted), settings; "
                                 "with --logprobs, logprobs."),
    logprobs: bool = typer.Option(False, "--logprobs", help="With --json: each character's log-probability."),
    color_by_prob: bool = typer.Option(False, "--color-by-prob", help="Colour each character by its probability."),
    compile_: bool = typer.Option(False, "--compile", help="Compile the decode step (5-10 s first): for long "
                                  "generations on a GPU, or a CPU without a C compiler for tfcli's kernel."),
    dtype: str = typer.Option("auto", help="Weights while sampling: auto (float16 for CPU models over 8 MB; "
                              "bfloat16 for batches of 3+ where the CPU has it natively), float32, float16 or "
                              "bfloat16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps or auto."),
    interactive: bool = typer.Option(False, "--interactive", "-i",
                                     help="Keep going: type text to add, the model continues after each line; "
                                     "/help lists the commands (/temp, /top, /undo...)."),
) -> None:
    """Generate text from a trained model.

    Filters apply in this order: repeat/presence/frequency penalties, top-k, top-p, min-p, then temperature.
    """
    from .corpus import check_unknown
    from .render.sample import prob_legend, styled
    from .sampling import collect, generate_pieces, is_greedy, native_decodes, new_seed

    check_unknown(unknown)
    if interactive:
        check_interactive(num_samples, as_json, stream, prompt, prompt_file)
    if logprobs and not as_json:
        raise UsageError("--logprobs goes with --json (use --color-by-prob to see probabilities as colours)")
    if color_by_prob and as_json:  # (it was silently ignored)
        raise UsageError("--color-by-prob colours text on a terminal; with --json, --logprobs gives the numbers")
    cfg = SampleConfig(max_new_tokens, temperature, top_k or None, top_p, min_p, repeat_penalty, repeat_last_n,
                       presence_penalty, frequency_penalty, None if seed == -1 else seed, num_samples,
                       tuple(stop or ()), compile_, dtype).validate()
    text = read_prompt(prompt, prompt_file)
    model = load_sampler(model_path, device, cfg)
    text = fit_prompt(model.vocab, text, unknown, " (or pass --unknown skip|replace)")
    cfg = with_overrides(cfg, stop=tuple(model.vocab.spelt_as_known(s) for s in cfg.stop))  # (as the prompt)
    warn_unmatchable_stops(cfg.stop, model.vocab)
    if cfg.seed is None:
        cfg = with_overrides(cfg, seed=new_seed())
        if not is_greedy(cfg.temperature):  # (greedy text is the same whatever the seed)
            stderr.print(f"seed {cfg.seed}", style="dim", highlight=False)
    if color_by_prob and not as_json and stdout.color_system is not None and not stdout.no_color:
        stderr.print(prob_legend(), highlight=False)  # (in a pipe or under NO_COLOR there are no colours to explain)
    elif color_by_prob and not as_json:
        why = "NO_COLOR is set" if stdout.no_color else "the output is not a colour terminal"
        stderr.print(f"note: --color-by-prob has no colours to show ({why}): plain text", style="dim",
                     highlight=False)
        color_by_prob = False  # (its styled text would be the terminal's: symbols for control characters)
    if compile_ and num_samples > 1:
        stderr.print("note: --compile applies to single samples; a batch decodes faster uncompiled",
                     style="dim", highlight=False)
    elif compile_ and native_decodes(model, 1, cfg):
        stderr.print("note: --compile is not used on a CPU where tfcli's C decode kernel runs: it is faster "
                     "uncompiled", style="dim", highlight=False)
    if interactive:
        run_interactive(model, cfg, text, unknown, color_by_prob)
        return
    pieces = generate_pieces(model, model.vocab, text, cfg, logprobs=color_by_prob or logprobs)
    if cfg.num_samples == 1 and stream and not as_json:
        stream_one(text, pieces, color_by_prob)
        return
    if (cfg.num_samples > 1 and stream and not as_json and stdout.is_terminal and not stdout.is_dumb_terminal
            and unicode_out()):  # (the live view draws │ ⏎ ⇥)
        outs, interrupted = collect_watched(text, pieces, cfg.num_samples)
    else:  # a Ctrl-C shows what was made, then exits 130
        outs, interrupted = collect(watched(pieces, cfg.max_new_tokens), cfg.num_samples)
    if as_json:
        settings = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}
        for i, out in enumerate(outs):  # (a batch's seed and its size reproduce it; `index` is the place in it)
            finish = "stop" if out.stopped else "interrupted" if interrupted else "length"  # (OpenAI's names)
            record = {"prompt": text, "text": out.text, "seed": cfg.seed, "index": i, "finish_reason": finish,
                      "settings": settings}
            print(json.dumps(record | ({"logprobs": out.logprobs} if logprobs else {})))
    else:
        for i, out in enumerate(outs):
            if cfg.num_samples > 1:
                stdout.rule(f"sample {i + 1}/{cfg.num_samples}", style="dim")
            show(text, style="bold")
            show(styled(out.text, out.logprobs, unicode_out()) if color_by_prob else out.text,
                 end="" if (text + out.text).endswith("\n") else "\n")
    if interrupted:
        raise KeyboardInterrupt


def collect_watched(prompt: str, pieces, n: int):
    """`collect`, with a line per sample on screen that follows it as it grows (gone at the end,
    when the samples print whole): a batch that printed only at the end looked stuck."""
    from rich.live import Live

    from .render.sample import batch_progress
    from .sampling import Aligned, collect

    rows = [Aligned() for _ in range(n)]
    width, height = stdout.size

    def view():
        return batch_progress(prompt, [row.tail(width) for row in rows], width, height)
    with Live(console=stdout, transient=True, refresh_per_second=8, get_renderable=view):
        return collect(pieces, n, rows)


def warn_unmatchable_stops(stops: tuple[str, ...], vocab) -> None:
    """A stop string holding a character the model cannot write never matches: say so, not run to -n."""
    from .corpus import show_char
    for stop in stops:
        unknown = [c for c in dict.fromkeys(stop) if c not in vocab.chars]
        if unknown:
            stderr.print(f"warning: --stop {stop!r} can never match: the model never writes "
                         f"{', '.join(show_char(c) for c in unknown)}{typed_escape(stop, vocab, prompt=False)}",
                         highlight=False, markup=False)


def typed_escape(text: str, vocab, prompt: bool = True) -> str:
    """A hint where `text` holds a backslash escape the shell passed as typed: '--stop "\\n"' is a
    backslash and an n, not a line end (the error named only the backslash, and --unknown skip
    made 'Moon\\nRiver' into 'MoonnRiver')."""
    if "\\" in vocab.chars or not re.search(r"\\[ntr]", text):
        return ""
    return (" (\\n in quotes is a backslash and an n, not a line end: in bash write $'\\n'"
            + (", or use --prompt-file)" if prompt else ")"))


def watched(pieces, total: int):
    """The pieces, with a tqdm bar on a terminal's stderr, ending once stdout's reader has gone:
    samples that print when done showed nothing for minutes, and ran on after `| head` had left."""
    from tqdm import tqdm

    checked = time.monotonic()
    with tqdm(total=total, unit="char", desc="sampling", leave=False, delay=1.0, disable=None, file=sys.stderr) as bar:
        for piece in pieces:
            bar.update(1)
            yield piece
            if time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                if reader_left(sys.stdout):
                    raise BrokenPipeError


def reader_left(stream) -> bool:
    """Whether the pipe `stream` writes to has lost its reader, found without writing to it: poll()
    flags the write end of such a pipe with an error (Linux, macOS). False for all but pipes."""
    import select
    import stat

    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) or not hasattr(select, "poll"):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def show(text: str | Text, style: str = "", end: str = "") -> None:
    """Sampled text (or a prompt) to stdout: on a terminal, styled and with its control characters as
    symbols (`for_terminal`); elsewhere exactly as generated, tabs too (rich expands them to
    spaces, which turned a TSV model's output into something else)."""
    from .render.sample import for_terminal

    if stdout.is_terminal:
        print_keeping_tabs(Text(for_terminal(text, unicode_out()), style=style) if isinstance(text, str) else text,
                           end)
    else:
        stdout.file.write(str(text) + end)


def print_keeping_tabs(text: Text, end: str = "") -> None:
    """`text` on the terminal, its tabs sent as tabs: rich turns each into spaces counted from the
    start of its own print call, so text printed in pieces (a prompt, then each character) lost its
    columns."""
    pieces = text.split("\t", allow_blank=True) if "\t" in text.plain else [text]
    for i, piece in enumerate(pieces):
        if i:
            stdout.file.write("\t")
        stdout.print(piece, end="")
    if end:
        stdout.print(end=end)


def unicode_out() -> bool:
    """Whether stdout's encoding has the control pictures (␛): not an ASCII or Latin-1 terminal."""
    return stdout.encoding.lower().replace("-", "").startswith(("utf", "gb18030"))


def stream_one(prompt: str, pieces, color_by_prob: bool) -> None:
    """Characters appear as they come; plain text goes straight to the stream (rich's per-call cost
    is more than a small model's step), flushed at most every 20 ms and at the end."""
    from .render.sample import for_terminal, styled
    from .sampling import Aligned

    show(prompt, style="bold")
    stdout.file.flush()
    row, out, last = Aligned(keep=False), stdout.file, 0.0  # the first character is flushed at once
    plain = functools.partial(for_terminal, unicode=unicode_out()) if stdout.is_terminal else str
    ends_line = prompt.endswith("\n")
    try:
        for piece in pieces:
            lps = row.add(piece.texts[0], piece.chars[0], piece.logprobs[0] if piece.logprobs else None)
            if not piece.texts[0]:
                continue
            ends_line = piece.texts[0].endswith("\n")
            if color_by_prob:
                print_keeping_tabs(styled(piece.texts[0], lps, unicode_out()))
            else:
                out.write(plain(piece.texts[0]))
            if time.monotonic() - last > 0.02:
                out.flush()
                last = time.monotonic()
    finally:  # (a Ctrl-C's message then starts a line of its own)
        stdout.print("" if ends_line else "\n", end="")  # text that ends its line gets no empty one after it
        out.flush()


def check_interactive(num_samples: int, as_json: bool, stream: bool, prompt: str | None,
                      prompt_file: Path | None) -> None:
    """--interactive streams one text and reads your lines from stdin: refuse what cannot go with that."""
    clash = [flag for flag, given in (("--num-samples", num_samples != 1), ("--json", as_json),
                                      ("--no-stream", not stream)) if given]
    if clash:
        raise UsageError(f"--interactive streams one text; drop {clash[0]}")
    if prompt == "-" or str(prompt_file) == "-":
        raise UsageError("--interactive reads your lines from stdin; give the prompt with --prompt TEXT "
                         "or --prompt-file FILE")


class ReplOutput:
    """Where an interactive session's writes go. The text goes to stdout, and the lines typed are echoed
    there only when stdin or stdout is not the terminal (on a terminal you see them as you type), so a
    piped run prints the whole text; remarks go to stderr. On a terminal every remark, listing and prompt
    starts on a line of its own (remarks too when only stdin is piped)."""

    def __init__(self, color_by_prob: bool):
        self.screen = stdout.is_terminal and sys.stdin.isatty()
        self.color_by_prob, self.at_line_start = color_by_prob, True

    def __call__(self, kind: str, text: str, logprob: float | None = None) -> None:
        from .render.sample import prob_style

        if kind in ("info", "error"):
            self.new_line(stdout.is_terminal)  # (stderr shares the screen: a remark starts its own line)
            stderr.print(Text.assemble(("error:", "bold red"), " ", text.replace("\n", " ")) if kind == "error"
                         else Text(text, style="dim"), soft_wrap=True)
            return
        if kind == "typed" and self.screen:
            self.at_line_start = True  # the terminal shows the line, and Enter left the cursor on the next
            return
        if kind == "listing":
            self.new_line(True)
        style = "bold" if kind in ("prompt", "typed") else prob_style(logprob) if (
            kind == "generated" and self.color_by_prob and logprob is not None) else ""
        show(text, style=style)
        stdout.file.flush()
        self.at_line_start = text.endswith("\n")

    def new_line(self, needed: bool) -> None:
        if needed and not self.at_line_start:
            stdout.print()
            self.at_line_start = True


def run_interactive(model, cfg: SampleConfig, prompt: str, unknown: str, color_by_prob: bool) -> None:
    """The REPL: one session over the loaded model, fed stdin's lines; EOF, /quit or Ctrl-C at the prompt end it."""
    from .repl import Session, read_lines

    out = ReplOutput(color_by_prob)
    fit = functools.partial(fit_prompt, model.vocab, unknown=unknown, hint=" (or start with --unknown skip|replace)")
    session = Session(model, cfg, out, prompt, seed=cfg.seed, fit=fit)
    if out.screen:
        stderr.print("type text to continue it, /help for commands, Ctrl-D to quit", style="dim", highlight=False)
    session.run(read_lines("> " if out.screen else "", before=lambda: out.new_line(out.screen)))
    out.new_line(True)


# -- inspect-attention -----------------------------------------------------------------------

VIEWS = ("head", "grid", "focus", "summary", "lens", "generated")
# Which views each option changes; giving one elsewhere is an error, not silently ignored.
APPLIES = {"--layer": ("head", "grid", "focus", "summary", "generated"), "--head": ("head", "generated"),
           "--at": ("focus", "lens"), "--aggregate": ("head", "generated"),
           "--generate": ("generated",), "--seed": ("generated",),
           "--range": ("head", "grid", "focus", "summary", "lens")}
DEFAULT_GENERATE = 20


def _pick_view(view: str | None, given: dict[str, object]) -> str:
    """--view, or the view the other options imply; then check every given option applies to it."""
    if view is None:
        implied = [v for flag, v in (("--generate", "generated"), ("--at", "focus"), ("--head", "head"),
                                     ("--aggregate", "head")) if given[flag] is not None]
        view = implied[0] if implied else "grid"
    if view not in VIEWS:
        raise UsageError(f"--view must be one of {', '.join(VIEWS)}, got {view!r}")
    for flag, value in given.items():
        if value is not None and view not in APPLIES[flag]:
            raise UsageError(f"{flag} does not apply to --view {view} (only to {' and '.join(APPLIES[flag])})")
    return view


def _index(i: int, n: int, flag: str) -> int:
    if not -n <= i < n:
        raise UsageError(f"{flag} {i} is out of range: there are {n} (0 to {n - 1})")
    return i % n


def _parse_range(spec: str, offset: int, total: int) -> tuple[int, int]:
    """--range A:B (prompt positions, B excluded, negative counts from the end) as indices into the seen text."""
    match = re.fullmatch(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*", spec)
    if not match:
        raise UsageError(f"--range must look like A:B (e.g. 10:40, :20, -30:), got {spec!r}")
    end = offset + total
    a, b = (None if g is None else int(g) + end * (int(g) < 0) for g in match.groups())
    if a is not None and b is not None and not a < b:
        raise UsageError(f"--range {spec} is empty: A must come before B")
    a, b = 0 if a is None else a, end if b is None else b
    a, b = max(offset, a), min(end, b)  # clamped to what the model saw, as a slice is to its sequence
    if not a < b:
        seen = f"{offset} to {end - 1}" + (" (earlier ones are past the context)" if offset else "")
        raise UsageError(f"--range {spec} selects no positions the model saw: it saw positions {seen}")
    return a - offset, b - offset


def _query(at: int | None, offset: int, n: int) -> int:
    """--at (a prompt position, or negative from the end) as an index into the n characters shown."""
    if at is None:
        return n - 1
    i = at - offset if at >= 0 else at + n
    if not 0 <= i < n:
        raise UsageError(f"--at {at} is out of range: the positions shown are {offset} to {offset + n - 1}")
    return i


def print_view(view, width: int | None = None) -> None:
    """A view on stdout; in a pipe or file, its lines (`width` wide, else the console's) without the
    trailing spaces that pad its columns (noise to whatever reads them; a terminal shows the same)."""
    if stdout.is_terminal:
        stdout.print(view)
        return
    plain = QuietConsole(file=io.StringIO(), width=width or stdout.width, color_system=None, highlight=False)
    plain.print(view)
    stdout.file.write("".join(line.rstrip() + "\n" for line in plain.file.getvalue().splitlines()))


def _check_export(path: Path | None) -> None:
    from .render.attention_views import EXPORT_SUFFIXES

    if path is None:
        return
    if path.suffix.lower() not in EXPORT_SUFFIXES:
        raise UsageError(f"--export {path}: unknown suffix; use {', '.join(EXPORT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise UsageError(f"--export {path}: no such directory {path.parent}")
    if path.is_dir():
        raise UsageError(f"--export {path} is a directory: name a file in it")


def _write_export(path: Path, renderable, record: dict, width: int) -> None:
    from .render.attention_views import export

    try:
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps(record), encoding="utf-8")
        else:
            export(renderable, path, width=width, title=f"tfcli inspect-attention: {record['text'][:40]}")
    except OSError as e:  # (the request was checked before the work: this is the disk's answer)
        raise TfcliError(f"--export {path}: cannot write ({e.strerror or e})") from None
    stderr.print(f"wrote {path}", style="dim", highlight=False, markup=False)


def _summary_view(model, att, start: int, stop: int, layers: list[int], color: bool, width: int):
    """Head patterns scored on the queries in [start, stop) of the text the model saw, each over
    all the keys it saw (a --range picks queries; cutting keys skewed every score)."""
    from .inspect import THRESHOLD, probe_attention, score_heads
    from .render.attention_views import summary_view

    ids = model.vocab.encode(att.text[:stop])
    probe, probe_weights = probe_attention(model)
    on_prompt = score_heads(att.weights[layers][..., :stop, :stop], ids, layers=layers, first_query=start)
    on_probe = score_heads(probe_weights[layers], probe, layers=layers)
    whole = (start, stop) == (0, len(att.text))
    scope = "on the prompt" if whole else f"from positions {att.offset + start}:{att.offset + stop} of the prompt"
    return summary_view(on_prompt, on_probe, att.text[start:stop], len(probe) // 2, THRESHOLD, color=color,
                        max_width=width, scope=scope)


def _generation(model, text: str, n: int, seed: int | None):
    from .inspect import generation_attention
    from .sampling import new_seed

    if n < 1:
        raise UsageError(f"--generate must be at least 1, got {n}")
    if seed is None or seed == -1:
        seed = new_seed()
        stderr.print(f"seed {seed}", style="dim", highlight=False)
    return generation_attention(model, text, n, seed)


def _generated_view(gen, layer: int | None, head: int | None, how: str | None, color: bool, width: int):
    from .inspect import aggregate
    from .render.attention_views import generated_view

    how = how or "mean"
    layers = slice(None) if layer is None else slice(layer, layer + 1)
    heads = slice(None) if head is None else slice(head, head + 1)
    over = [name for name, given in (("layers", layer), ("heads", head)) if given is None]
    where = ", ".join([f"layer {layer}"] * (layer is not None) + [f"head {head}"] * (head is not None)
                      + [f"{how} over all {' and '.join(over)}"] * bool(over))
    weights = [aggregate(s.weights[layers, heads], how, (0, 1)) for s in gen.steps]
    return generated_view(gen, weights, where, color=color, max_width=width)


def _own_prompt(model, view: str, seed: int | None, layer: int) -> tuple[str, int]:
    """Without --prompt: text the model writes (the generated view starts from its first character),
    as long as the heatmap shows at this width: a longer one hid its start, where the top rows'
    attention went."""
    from .inspect import OWN_TEXT, opening, own_text
    from .render.heatmap import positions_shown
    from .sampling import new_seed

    seed = new_seed() if seed is None or seed == -1 else seed
    if view == "generated":
        return opening(model.vocab), seed
    text = own_text(model, seed, positions_shown(view, layer, model.config.n_head, stdout.width) or OWN_TEXT)
    stderr.print(f"note: no --prompt given: looking at text the model wrote (seed {seed}; --prompt TEXT to choose)",
                 highlight=False)
    return text, seed


@app.command("inspect-attention")
@handle_errors(builds=("decode_attention.c", "decode_matmul.c"), torch=False)  # (--view generated samples)
def inspect_attention(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text to look at ('-': read stdin)."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt from a file ('-': stdin)."),
    view: Optional[str] = typer.Option(
        None, help="head (one head), grid (every layer x head; without --view, the last layer's heads), focus (where "
        "each head looks from one position), summary (each head's pattern), lens (logit lens), generated "
        "(attention behind sampled text)."),
    layer: Optional[int] = typer.Option(None, help="Layer to show (negative counts from the end) \\[default: last; "
                                        "all for --view grid, focus, summary and generated]."),
    head: Optional[int] = typer.Option(None, help="Head to show (head, generated) \\[default: 0 / all]."),
    at: Optional[int] = typer.Option(None, help="Position of the query for focus and lens \\[default: last]."),
    generate_: Optional[int] = typer.Option(None, "--generate", help=f"Characters to sample for --view generated "
                                            f"\\[default: {DEFAULT_GENERATE}]."),
    seed: Optional[int] = typer.Option(None, help="Random seed for --generate, and for the text a call without "
                                       "--prompt writes; -1: random \\[default: random, printed]."),
    aggregate_: Optional[str] = typer.Option(None, "--aggregate", help="Combine heads, mean or max: a layer's "
                                                 "(head view), or all layers' (generated view)."),
    range_: Optional[str] = typer.Option(None, "--range", help="Prompt positions A:B to show (B excluded)."),
    export: Optional[Path] = typer.Option(None, help="Also write the view to FILE: .svg, .html, or .json "
                                          "(the raw weights)."),
    unknown: str = typer.Option("error", help="Unknown prompt characters: error, skip or replace (as in sample)."),
) -> None:
    """Show what the attention heads look at, as heatmaps in the terminal.

    Attention weights show where information can flow, not why the model predicts what it does:
    read them as a hint, not an explanation.
    """
    from .corpus import check_unknown
    from .inspect import aggregate, attention, logit_lens
    from .render import attention_views, heatmap

    own = prompt is None and prompt_file is None  # the model writes the text to look at (--seed picks it)
    given = {"--layer": layer, "--head": head, "--at": at, "--aggregate": aggregate_, "--generate": generate_,
             "--seed": None if own else seed, "--range": range_}
    explicit, view = view, _pick_view(view, given)
    if aggregate_ is not None and aggregate_ not in ("mean", "max"):
        raise UsageError(f"--aggregate must be mean or max, got {aggregate_!r}")
    if aggregate_ is not None and head is not None:
        raise UsageError("--aggregate combines all of a layer's heads; give it or --head, not both")
    _check_export(export)
    check_unknown(unknown)
    text = read_prompt(prompt, prompt_file)
    model = load_native(model_path)  # (its forward in numpy: no torch to import)
    L, H = model.config.n_layer, model.config.n_head
    li = _index(layer, L, "--layer") if layer is not None else None  # (checked before any text is written)
    hi = _index(head, H, "--head") if head is not None else None
    if own:
        text, seed = _own_prompt(model, view, seed, L - 1 if li is None else li)
    typed, text = text, fit_prompt(model.vocab, text, unknown, " (or pass --unknown skip|replace)")
    if typed and not text:
        raise UsageError("nothing is left of the prompt once its unknown characters are dropped")
    att = attention(model, text)
    if att.offset and view != "generated":
        stderr.print(f"note: the prompt is longer than the context ({model.config.block_size}); "
                     f"showing its last {len(att.text)} characters", highlight=False)
    start, stop = _parse_range(range_, att.offset, len(att.text)) if range_ else (0, len(att.text))
    chars, weights, offset = att.text[start:stop], att.weights[..., start:stop, start:stop], att.offset + start
    layers = list(range(L)) if li is None else [li]
    color = stdout.color_system is not None and not stdout.no_color  # NO_COLOR: shades, not uniform blocks
    width = stdout.width
    pos = _query(at, offset, len(chars))
    lens = logit_lens(model, att.text, start + pos) if view == "lens" else None
    if view == "generated":
        gen = _generation(model, text, DEFAULT_GENERATE if generate_ is None else generate_, seed)
        att = attention(model, gen.text)

    # the layers drawn: a bare grid, and a head view without --layer, show the last one
    shown = [L - 1] if li is None and (view == "head" or view == "grid" and explicit != "grid") else layers

    def draw(color: bool):
        if view == "grid":
            return heatmap.grid_view(weights[shown], chars, layer_labels=shown, color=color, max_width=width,
                                     offset=offset, first_sees_itself=start == 0)
        if view == "head":
            layer_ = shown[0]
            if aggregate_:
                w, title = aggregate(weights[layer_], aggregate_, 0), f"layer {layer_}, {aggregate_} over {H} heads"
            else:
                w, title = weights[layer_, hi or 0], f"layer {layer_}, head {hi or 0}"
            return heatmap.head_view(w, chars, title=title, color=color, max_width=width, offset=offset,
                                     first_sees_itself=start == 0)
        if view == "focus":  # --range bounds the query; its keys are all it saw
            return heatmap.focus_view(att.weights[layers], att.text, start + pos, color=color, layer_labels=layers,
                                      offset=att.offset)
        if view == "summary":
            return _summary_view(model, att, start, stop, layers, color, width)
        if view == "lens":
            return attention_views.lens_view(lens, att.text, offset=att.offset, color=color,
                                             max_width=width)
        return _generated_view(gen, li, hi, aggregate_, color, width)

    print_view(draw(color))
    if start and view in ("head", "grid"):  # (a row that looked only before the range reads as blank)
        stderr.print(f"note: --range shows the keys from position {offset} on; attention to earlier ones is not "
                     "drawn, so a row's shares can add up to less than 1", highlight=False)
    if export is not None:  # in colour wherever stdout goes: a file is looked at elsewhere
        # the weights drawn: queries as rows (from text[first_query] on), every key they saw as columns
        first = 0
        if view == "generated":
            chars, weights, offset = att.text, att.weights, att.offset
        elif view in ("focus", "summary", "lens"):  # --range picks their queries; their keys are all before
            chars, weights, offset, first = att.text[:stop], att.weights[..., start:stop, :stop], att.offset, start
        heads = list(range(H)) if hi is None or aggregate_ else [hi]
        record = {"text": chars, "offset": offset, "first_query": first, "layers": shown, "heads": heads,
                  "weights": weights[shown][:, heads].round(6).tolist()}
        _write_export(export, draw(True), record, width)


# -- eval, info ------------------------------------------------------------------------------

@contextlib.contextmanager
def progress(total: int, what: str, unit: str, every: float = 30.0):
    """An update(n) for long work: a tqdm bar on a terminal's stderr; elsewhere (a log, a pipe) a
    plain line every `every` seconds, so a run of many minutes does not look hung."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        with tqdm(total=total, unit=unit, unit_scale=True, desc=what, leave=False) as bar:
            yield bar.update
        return
    from .render.progress import fmt_count, fmt_time
    done, start, last = 0, time.monotonic(), time.monotonic()

    def update(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= every and done < total:
            last, rate = now, done / max(now - start, 1e-9)
            print(f"{what}: {fmt_count(done)}/{fmt_count(total)} {unit}s ({done / total:.0%}), "
                  f"{fmt_time(now - start)} elapsed, eta {fmt_time((total - done) / rate)}",
                  file=sys.stderr, flush=True)
    yield update


@app.command("eval")
@handle_errors
def eval_(
    file: list[Path] = typer.Argument(..., help="Held-out text files ('-': stdin).", metavar="FILE",
                                      show_default=False),
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: int = typer.Option(32, help="Windows scored at once."),
    as_json: bool = typer.Option(False, "--json", help='Print {"chars", "loss", "bpc", "perplexity"}.'),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps or auto."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the files."),
    errors: str = typer.Option("strict", help="On undecodable bytes: strict (refuse) or replace."),
    unknown: str = typer.Option("error", help="Characters the model never saw: error, or skip (drop them and "
                                "score the rest)."),
) -> None:
    """Loss on held-out text: every character scored once, in windows of the model's context."""
    from collections import Counter

    from .corpus import encode_text, show_char
    from .evaluation import evaluate

    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip, got {unknown!r}")
    model = load(model_path, device)
    skipped = Counter() if unknown == "skip" else None
    if any(str(f) == "-" for f in file):
        stdin_hint("the text")
    ids = encode_text(file, model.vocab, encoding, errors, skipped)
    if skipped:
        from .render import plural
        top = ", ".join(f"{show_char(c)} ×{n:,}" for c, n in skipped.most_common(5))
        stderr.print(f"note: skipped {plural(sum(skipped.values()), 'character')} the model never saw ({top}"
                     f"{', …' if len(skipped) > 5 else ''})", highlight=False, markup=False)
    if len(ids) < 2:
        raise UsageError("need at least two characters to evaluate")
    with progress(len(ids) - 1, "eval", "char") as update:
        result = evaluate(model, ids, batch_size, on_progress=update)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        from .render import plural
        stdout.print(f"{plural(result.chars, 'char')}: loss {result.loss:.4f} nats/char, {result.bpc:.4f} bits/char, "
                     f"perplexity {result.perplexity:.3f}")


def training_settings(s: dict) -> str:
    """A run's training settings in a line, so that runs can be told apart: 'muon, lr 0.006, batch
    32, bfloat16 on cpu, compiled, seed 1337'."""
    t = s["train"]
    parts = [t.get("optimizer", "adamw"), f"lr {t['lr']:g}", f"batch {t['batch_size']}"
             + (f" in {t['grad_accum']} micro-batches" if t.get("grad_accum", 1) > 1 else "")]
    if "dtype" in s:  # (runs from before these were recorded say only what was asked)
        processes = f" x {s['processes']} processes" if s.get("processes", 1) > 1 else ""
        parts.append(f"{s['dtype']} on {s['device']}{processes}")
        parts += ["compiled"] if s.get("compiled") else []
    return ", ".join(parts + [f"seed {t['seed']}"])


@app.command()
@handle_errors(torch=False)
def info(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a checkpoint holds: its config, size, vocabulary and training summary."""
    model = load_native(model_path)  # (no torch to import: 0.3 s rather than 2)
    record = {"path": str(model.path), "params": model.num_params(), "config": model.config.to_dict(),
              "vocab": model.vocab.chars, "summary": model.summary}
    if as_json:
        print(json.dumps(record))
        return
    from .render import plural
    from .render.heatmap import INVISIBLE, visible
    c, s = model.config, model.summary
    stdout.print(Text(str(model.path), style="bold"))
    stdout.print(f"  {model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
                 f"context {c.block_size}, vocabulary {c.vocab_size}")
    hidden = [f"U+{ord(ch):04X}" for ch in model.vocab.chars if visible(ch) == INVISIBLE]  # (format characters)
    stdout.print("  vocabulary: " + "".join(visible(ch) for ch in model.vocab.chars)
                 + (f" ({INVISIBLE}: {', '.join(hidden)})" if hidden else ""), markup=False)
    if s.get("step") is not None:
        val = f", val loss {s['val_loss']:.4f}" if s.get("val_loss") is not None else ""
        val += f" at step {s['val_step']}" if val and s.get("val_step") not in (None, s["step"]) else ""
        if s.get("best_step") not in (None, s["step"]) and s.get("best_val_loss") is not None:
            val += f"; best {s['best_val_loss']:.4f} at step {s['best_step']} (best.safetensors)"
        done = [plural(s["step"], "step")]  # best.safetensors keeps only its step and loss
        done += [f"{s['tokens']:,} tokens"] if "tokens" in s else []
        done += [f"{s['seconds']} s"] if "seconds" in s else []
        stdout.print(f"  trained {', '.join(done)}{val}", markup=False)
        if "train" in s:
            stdout.print(f"  with {training_settings(s)}", markup=False, highlight=False)


@app.command()
@handle_errors
def bench(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the training step \\[default: as train does]."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="SHAPE",
                                              help="Only these shapes: 0.8M, 4.8M, 10.7M."),
    seconds: float = typer.Option(6.0, help="Timed seconds per training shape (after warm-up)."),
) -> None:
    """Training tokens/s and sampling chars/s at nanoGPT's three model shapes."""
    from . import bench as b

    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--seconds must be a positive number of seconds, got {seconds}")
    unknown = [s for s in shape or [] if s not in b.SHAPES]
    if unknown:
        raise UsageError(f"unknown --shape {unknown[0]!r}; choose from {', '.join(b.SHAPES)}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    def stage(what: str) -> None:
        stderr.print(f"bench: {what}…", style="dim", highlight=False)
    result = b.run(device, dtype, compile_, shape or None, seconds, on_stage=stage)
    if as_json:
        print(json.dumps(result))
        return
    from rich import box
    from rich.table import Table

    plain = not stdout.is_terminal  # (a pipe or file: columns without a box, none of them cut to 80)
    t = Table(title=f"tfcli bench: {result['device']}; training in {result['dtype']}"
                    f"{', compiled' if result['compile'] else ''}; peak {result['peak_gflops']:.0f} GFLOP/s (probed)",
              box=None if plain else box.HEAVY_HEAD, title_justify="left" if plain else "center",
              caption_justify="left" if plain else "center")
    for col in ("shape", "params", "train tok/s", "GFLOP/s", "% of peak", "sample chars/s (weights)",
                "--compile chars/s", "16 samples (x one's time)", "first char"):
        t.add_column(col, justify="right")
    for name, r in result["train"].items():
        s = result["sample"].get(name, {})
        rate = f"{s['chars_per_s']:,.0f} ({s['dtype']})" if s else "–"
        compiled = f"{s['compiled_chars_per_s']:,.0f}" if "compiled_chars_per_s" in s else "–"
        batch = f"{s['num_samples_16_cost']:.1f}x" if "num_samples_16_cost" in s else "–"
        if s.get("num_samples_16_dtype", s.get("dtype")) != s.get("dtype"):  # (a batch's own weights)
            batch += f" ({s['num_samples_16_dtype']})"
        first = f"{s['first_char_s']:.2f} s" if "first_char_s" in s else "–"
        t.add_row(name, f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}", f"{r['gflops']:.0f}",
                  f"{r['peak_fraction']:.0%}", rate, compiled, batch, first)
    if result["sample"]:
        t.caption = ("sampling attends through tfcli's C kernel (float16 keys and values with half weights)"
                     if result["decode_kernel"]
                     else "sampling attends through PyTorch (tfcli's C kernel is off or could not be built)")
        if result.get("decode_matmul"):
            t.caption += f"; half weights multiply in C ({', '.join(result['decode_matmul'])})"
        t.caption += "; –: not measured (--compile is measured only where it is used: no C kernel, --compile on)"
    print_view(t, width=200)  # (in a pipe: plain columns, none cut to 80, no padding at line ends)


def _plain_help() -> None:
    """Help texts escape [ for rich's markup; click's plain help (piped: see __main__) shows them as typed."""
    import inspect

    import typer.core
    import typer.models

    if typer.core.HAS_RICH:
        return
    for command in app.registered_commands:
        for param in inspect.signature(command.callback).parameters.values():
            info = param.default
            if isinstance(info, typer.models.ParameterInfo) and info.help:
                info.help = info.help.replace("\\[", "[")


def run() -> None:
    """The `tfcli` command. Typer's own usage errors (an unknown option, a missing argument) come
    out as one line, like tfcli's, rather than in its four-line box."""
    import typer.core

    click = getattr(typer.core, "_click", None) or typer.core.click  # typer 0.29 vendors click; older ones import it

    _plain_help()
    try:
        code = app(standalone_mode=False)
    except click.exceptions.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # its message is the help: rich has printed it, plain has not
            if e.format_message():
                print(e.format_message().rstrip("\n"))
        elif torchrun_rank() == "0":  # (under torchrun rank 0 says what is wrong with the flags)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            stderr.print(Text.assemble(("error:", "bold red"), " ", e.format_message() + hint), soft_wrap=True)
        else:
            quiet_exit_delay()
        code = e.exit_code
    except typer.Abort as e:  # (typer's for an EOFError or a Ctrl-C outside a command; click's in older typers)
        if isinstance(e.__context__ or e.__cause__, KeyboardInterrupt):
            stderr.print(Text.assemble(("error:", "bold red"), " interrupted"))
            code = INTERRUPTED
        else:
            stderr.print(Text.assemble(("error:", "bold red"), " aborted"))
            code = 1
    sys.exit(code if isinstance(code, int) else 0)
