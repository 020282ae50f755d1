"""Stopping a run by signal: Ctrl-C finishes the step, saves and ends the run; a second quits at once.

`train` polls its `should_stop` after every step, so a signal handler only raises a flag and the
run ends between steps, where its state is whole. The CLI and a notebook's `tfcli.train` share this.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """A second SIGTERM: stop at once, like a second Ctrl-C, but exit 143 as a shell expects."""


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C that `e` was raised over, if any. Python 3.11 wraps whatever interrupts a class's
    `__set_name__` in a RuntimeError: a Ctrl-C during an import that defines a `cached_property`
    (ipaddress's, under typer) reached the user as that RuntimeError's traceback."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class StopFlag:
    """A `should_stop` raised by the first SIGINT or SIGTERM; the second raises KeyboardInterrupt
    (Terminated for SIGTERM) at once, which loses nothing: saves are atomic.

    Until the trainer first polls the flag (its first step has ended), the first signal quits at
    once too: that step may be a minute of compiling, with nothing to save. Not when `alone` is
    False (torchrun's ranks must agree to stop after a step, or one waits on the others for ever).
    Outside the main thread, where Python allows no signal handler, nothing is installed."""

    def __init__(self, alone: bool = True):
        self.signum: int | None = None
        self.alone, self.polled = alone, False
        self.previous: dict = {}
        self.hushed: warnings.catch_warnings | None = None

    def __call__(self) -> bool:
        self.polled = True
        return self.signum is not None

    def handle(self, signum, frame) -> None:
        if self.signum is not None or (self.alone and not self.polled):
            self.signum = signum  # (the exit code names this signal, as a shell's would)
            # torch.compile traces the backward in anomaly mode, which reports the interrupt as a
            # warning with the forward's stack: noise, not news, for someone who pressed Ctrl-C
            # (hushed until __exit__, so a notebook's later anomaly reports still show)
            if self.hushed is None:
                self.hushed = warnings.catch_warnings()
                self.hushed.__enter__()
                warnings.filterwarnings("ignore", message="Error detected in")
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self.signum = signum
        self.stopping(signum)

    def stopping(self, signum: int) -> None:
        """Called on the first signal that lets the step finish (the CLI says so on stderr)."""

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # (None: a handler set from C, which Python cannot put back)
                signal.signal(s, handler)
        if self.hushed is not None:
            self.hushed.__exit__(None, None, None)


class TermAsInterrupt:
    """SIGTERM raises Terminated (a KeyboardInterrupt) for a command's whole length, so that what
    `timeout` or a service manager stops ends as a Ctrl-C does (sample prints what it made) rather
    than at once with nothing written; `received` says it came, for the exit code (143, not 130).
    Inside `train`, StopFlag takes SIGTERM over and gives it back."""

    def __init__(self):
        self.received = False
        self.previous = None

    def handle(self, signum, frame) -> None:
        self.received = True
        raise Terminated

    def __enter__(self) -> TermAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@contextlib.contextmanager
def default_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM end the process at once for a while, whatever handles them outside. For
    a torchrun process waiting for the others to join: that wait is in C++, where a Python handler
    never runs, so torchrun's SIGTERM (another process failed) went unheard until its SIGKILL 30 s
    later; before the group is joined there is nothing to save."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.signal(signum, signal.SIG_DFL) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
