"""Training progress for a person: a rich live dashboard on a terminal, plain log lines elsewhere.

Both are callbacks over `tfcli.train` events; neither knows how training works.
The plain form prints a line at most every `every` seconds plus every evaluation,
so a log file stays readable and free of control codes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import replace

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..checkpoint import BEST_FILE
from ..config import TrainConfig
from ..events import Done, Eval, Notice, Sample, Start, Step
from . import plural
from .heatmap import visible

LN2 = math.log(2)
JOINERS = "\u200c\u200d"  # (zero-width non-joiner and joiner: parts of emoji and of some scripts' words)


def sample_line(text: str) -> str:
    """A sample on one line of a log or the dashboard: newlines as ⏎, and control and format
    characters as symbols. A corpus of terminal logs teaches a model escape codes, and a
    bidirectional override would reorder the rest of the line; the text itself is not ours to show
    raw here (`tfcli sample` prints it as generated)."""
    return "".join(" ⏎ " if c == "\n" else c if c.isprintable() or c == " " or c in JOINERS else visible(c)
                   for c in text.strip())


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def describe_limits(t: TrainConfig) -> str:
    """"up to 4 epochs or 5:00" where several limits are set: whichever comes first ends the run (a
    list read as if the run would go through all of them, and a 20 s run does not reach 4 epochs)."""
    epochs = f"{t.epochs:{',.0f' if t.epochs >= 100 else '.3g'}} epoch{'s' * (t.epochs != 1)}" if t.epochs else ""
    limits = [plural(t.max_steps, "step") if t.max_steps else "", epochs,
              fmt_time(t.time_budget) if t.time_budget else ""]
    limits = [x for x in limits if x]
    if len(limits) <= 1:
        return "".join(limits) + (" budget" if t.time_budget else "") if limits else "no limit"
    return "up to " + ", ".join(limits[:-1]) + " or " + limits[-1]


def describe_start(e: Start) -> str:
    m = e.model
    budget = describe_limits(e.train)
    dropout = f", dropout {m.dropout:g}" if m.dropout else ""
    resumed = f", resuming at step {e.start_step}" if e.start_step else ""
    micro = f" in {e.train.grad_accum} micro-batches" if e.train.grad_accum > 1 else ""
    return (f"model: {fmt_count(e.n_params)} params ({m.n_layer} layers, {m.n_head} heads, {m.n_embd:,} wide, "
            f"context {m.block_size:,}{dropout}), batch {e.train.batch_size:,}{micro}, lr {e.train.lr:g}\n"
            f"device: {e.device}{f' × {e.processes} processes' if e.processes > 1 else ''} "
            f"({e.dtype}{', compiled' if e.compiled else ''}, {e.train.optimizer}); "
            f"{budget}{resumed}; writing {e.run_dir}")


class Eta:
    """Time left at the pace since the first step shown: a resumed run starts part of the way
    through its schedule, and a first step carries start-up and compilation."""

    def __init__(self):
        self.start: tuple[float, float] | None = None

    def __call__(self, progress: float, elapsed: float) -> float | None:
        if self.start is None:
            self.start = (progress, elapsed)
        p0, t0 = self.start
        return (elapsed - t0) * (1 - progress) / (progress - p0) if progress - p0 > 0.01 else None


class NullProgress:
    """Shows nothing: torchrun's ranks other than 0, whose events rank 0 already shows."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, e) -> None:
        pass


class PlainProgress:
    """Log lines for pipes and files."""

    def __init__(self, console: Console, every: float = 10.0, warnings: Console | None = None):
        self.console, self.every, self.last = console, every, -math.inf
        self.warnings = warnings or console  # (stderr, as every command's warnings)
        self.eta = Eta()
        self.vocab_size: int | None = None  # (from Start: the closing line compares the loss with a guess)
        self.train_loss: float | None = None  # (the last validation's)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __call__(self, e) -> None:
        out = self.console.print
        if isinstance(e, Start):
            self.vocab_size = e.vocab_size
            out(describe_start(e), highlight=False)
        elif isinstance(e, Step) and (time.monotonic() - self.last >= self.every or e.step == 1):
            self.last = time.monotonic()
            left = self.eta(e.progress, e.elapsed)
            out(f"step {e.step:>6}  loss {e.loss:.4f}  {fmt_count(e.tokens_per_s)} tok/s  lr {e.lr:.2e}  "
                f"{fmt_time(e.elapsed)}" + (f"  eta {fmt_time(left)}" if left is not None else ""), highlight=False)
        elif isinstance(e, Eval) and e.val_loss is not None:
            self.train_loss = e.train_loss
            recent = f"  train {e.train_loss:.4f}" if math.isfinite(e.train_loss) else ""  # (its recent steps' mean)
            out(f"step {e.step:>6}  val {e.val_loss:.4f} ({e.val_loss / LN2:.3f} bits/char){recent}"
                + ("  best" if e.best else ""), highlight=False)
        elif isinstance(e, Sample):
            out(f"sample: {sample_line(e.text)[:100]}", highlight=False, markup=False)
        elif isinstance(e, Notice):
            self.warnings.print(f"warning: {e.message}", highlight=False, markup=False)
        elif isinstance(e, Done):
            out(describe_done(e, self.vocab_size, self.train_loss), highlight=False)


def describe_done(e: Done, vocab_size: int | None = None, train_loss: float | None = None) -> str:
    """The closing line; `train_loss`, the last validation's (its recent steps' mean), tells a model
    that learnt nothing from one that learnt its training text only."""
    val = ""
    if e.val_loss is not None:  # (an interrupted run saves without validating: say when it last did)
        at = f" at step {e.val_step}" if e.val_step not in (None, e.step) else ""
        val = f", {'last ' if at else ''}val loss {e.val_loss:.4f} ({e.val_loss / LN2:.3f} bits/char){at}"
    why = {"steps": "reached --max-steps", "epochs": "reached its epoch limit", "time": "time budget spent",
           "interrupted": "interrupted"}[e.reason]
    line = f"done: {plural(e.step, 'step')} in {fmt_time(e.elapsed)} ({why}){val}; model in {e.run_dir}"
    return line + overfit_note(e) + untrained_note(e, vocab_size, train_loss)


def untrained_note(e: Done, vocab_size: int | None, train_loss: float | None = None) -> str:
    """A second line when validation is still near a uniform guess over the vocabulary: a run on a
    slow or busy machine (11 steps in a minute) wrote noise, and nothing said why. Where the training
    loss is far below that guess, the model did learn, its training text only: on a 34-character
    text (train loss 0.00, val 12.9), "train it for longer" was the wrong advice. A run that ended as
    planned is to be run again for longer, not resumed: `--resume` after 5 steps of a 15 s budget
    scored 2.59 in 118 steps at the schedule's floor, a fresh 20 s run 2.05 in 117."""
    if e.val_loss is None or not vocab_size or vocab_size < 2 or e.val_loss < 0.9 * math.log(vocab_size):
        return ""
    guess, uniform = f"a uniform guess over its {vocab_size:,} characters", math.log(vocab_size)
    if train_loss is not None and math.isfinite(train_loss) and train_loss < 0.5 * uniform:
        return (f"\nthe model learnt its training text (train loss {train_loss:.2f}) but scores the validation "
                f"text no better than {guess} ({uniform:.2f}): the two texts differ, or there is too little "
                "text to generalise from; give it more")
    longer = "--resume to go on" if e.reason == "interrupted" else (
        "a new run with more --time: a resumed one goes on at the end of its learning-rate schedule, at a twentieth of "
        "the rate, and learns slowly")
    return f"\nthe model has barely learnt yet: {guess} scores {uniform:.2f}; train it for longer ({longer})"


OVERFIT_MARGIN = 0.02  # nats/char: more than the run-to-run noise of the validation slice


def overfit_note(e: Done) -> str:
    """A second line when validation ended well above its best: the run memorised the text, and
    the better model is the one in best.safetensors."""
    if e.val_loss is None or e.best_val_loss is None or e.val_loss - e.best_val_loss < OVERFIT_MARGIN:
        return ""
    at = f" at step {e.best_step}" if e.best_step is not None else ""
    best = e.run_dir / BEST_FILE
    return (f"\nbest val loss {e.best_val_loss:.4f}{at}, kept in {best}; validation rose after it, so the model "
            f"memorised the training text: sample the best with -m {best}; to do better on this text, train a smaller "
            f"model (--preset small or tiny) or with more --dropout, or give it more text")


def figures(width: int, *items: tuple[str, str, str]) -> Text:
    """(label, bold value, rest) items on lines of `width` cells, broken between items only: a
    table's columns squeezed on a narrow terminal cut the loss to '2.56…' and stacked each label
    over its value (rich's own wrapping breaks at any space)."""
    out, used = Text(no_wrap=True, overflow="ellipsis"), 0
    for label, value, rest in items:
        n = len(label) + len(value) + len(rest)
        if used:
            out.append("\n" if used + 2 + n > width else "  ")
            used = 0 if used + 2 + n > width else used + 2
        out.append(label)
        out.append(value, style="bold")
        out.append(rest)
        used += n
    return out


def quiet_control_echo():
    """Stop the terminal echoing ^C while the dashboard is up (what to give `restore_echo`): the two
    characters it wrote at the cursor moved the dashboard's next redraw down a line, leaving a stray
    border above it after every Ctrl-C. Not from a background job (`train ... &`, or under `timeout`,
    which runs it in a process group of its own): changing the terminal stopped it there (SIGTTOU)."""
    try:
        import termios
    except ImportError:  # (not POSIX)
        return None
    try:
        fd = sys.stdin.fileno()
        if _in_background(fd):
            return None
        saved = termios.tcgetattr(fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHOCTL  # (lflag)
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        return fd, saved
    except (AttributeError, ValueError, OSError, termios.error):  # stdin not a terminal, closed or replaced
        return None


def _in_background(fd: int) -> bool:
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:  # (not this process's controlling terminal, or none: no job control to stop it)
        return False


def restore_echo(echo) -> None:
    """Put back what `quiet_control_echo` changed, even from a job sent to the background since
    (Ctrl-Z, bg): there the change would stop it, unless SIGTTOU is ignored meanwhile."""
    if echo is not None:
        import termios
        ignoring = threading.current_thread() is threading.main_thread()  # (only it may set handlers)
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN) if ignoring else None
        try:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(echo[0], termios.TCSANOW, echo[1])
        finally:
            if ignoring:
                signal.signal(signal.SIGTTOU, previous)


class LiveProgress:
    """The dashboard: a progress bar, the latest numbers and a sample line, redrawn 4 times a second."""

    def __init__(self, console: Console, warnings: Console | None = None):
        self.console = console
        self.warnings = warnings or console  # (shown above the dashboard, which redirects stderr)
        self.start: Start | None = None
        self.step: Step | None = None
        self.eval: Eval | None = None
        self.sample = ""
        self.eta = Eta()
        self.finished = False
        self.soon: list[str] = []
        self.live = Live(console=console, refresh_per_second=4, transient=False, get_renderable=self.render)

    def say_soon(self, message: str) -> None:
        """A line to show above the dashboard with the next event. For a signal handler: printed from
        there, while the dashboard was mid-redraw, the line was lost and a border drawn twice."""
        self.soon.append(message)

    def __enter__(self):
        self.echo = quiet_control_echo()
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.live.__exit__(*exc)
        finally:
            restore_echo(self.echo)

    def show_above(self, line) -> None:
        """A warning or note above the dashboard. Where stderr is the same screen, through the
        dashboard's own console: written to stderr directly, the next redraw wrote over it."""
        console = self.console if self.warnings.is_terminal and self.console.is_terminal else self.warnings
        console.print(line, highlight=False)

    def __call__(self, e) -> None:
        while self.soon:
            self.show_above(self.soon.pop(0))
        if isinstance(e, Start):
            self.start = e
            self.console.print(describe_start(e), highlight=False)
        elif isinstance(e, Step):
            self.step = e
        elif isinstance(e, Eval):
            self.eval = e
        elif isinstance(e, Sample):
            self.sample = e.text
        elif isinstance(e, Notice):
            self.show_above(Text.assemble(("warning:", "yellow"), f" {e.message}"))
        elif isinstance(e, Done):
            if self.step is not None:  # an interrupted run's bar stays where it stopped
                self.step = replace(self.step, step=e.step,
                                    progress=self.step.progress if e.reason == "interrupted" else 1.0)
            self.finished = True  # no ETA: nothing is left to wait for
            self.live.update(self.render(), refresh=True)
            self.live.stop()  # the summary line goes under the final panel, not above it
            self.console.print(describe_done(e, self.start.vocab_size if self.start else None,
                                             self.eval.train_loss if self.eval else None), highlight=False)

    def render(self):
        s = self.step
        if s is None:
            return Text("starting…", style="dim")
        left = None if self.finished else self.eta(s.progress, s.elapsed)
        budget = self.start.train.time_budget if self.start else None
        if left is not None and budget:  # (never past the --time budget, which counts from the same start)
            left = min(left, max(0.0, budget - s.elapsed))
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=1.0, completed=min(s.progress, 1.0), width=30),
                    f"{s.progress:4.0%}", f"{fmt_time(s.elapsed)} elapsed",
                    f"eta {fmt_time(left)}" if left is not None else "")
        val = self.eval.val_loss if self.eval else None
        nums = figures(self.console.width - 4, ("step ", str(s.step), ""), ("loss ", f"{s.loss:.4f}", ""),
                       ("val ", f"{val:.4f}", f" ({val / LN2:.3f} bpc)") if val is not None else ("val –", "", ""),
                       (f"{fmt_count(s.tokens_per_s)} tok/s", "", ""), (f"lr {s.lr:.1e}", "", ""))
        sample = Text(sample_line(self.sample), style="italic", no_wrap=True, overflow="ellipsis")
        return Panel(Group(bar, nums, sample), title="tfcli train", title_align="left", border_style="blue")
