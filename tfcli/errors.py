"""The one exception users see.

Problems are raised where they are found, as a `TfcliError` carrying a one-line
message and an exit code; only the CLI (commands/common.py) turns it into text, so the library stays
usable from a notebook (where a traceback is the right thing to show). A message names a setting
as its reader spells it (`setting`): `--n-layer 0` at the command line, `n_layer=0` in Python.
"""

import contextlib
import contextvars
import os
import sys
import warnings

USAGE = 2  # the user asked for something that cannot work (typer uses 2 too)
RUNTIME = 1  # the request was sound but the work failed
INTERRUPTED = 130  # 128 + SIGINT


class TfcliError(Exception):
    """A failure the user can act on: the message says what happened and what to do."""

    def __init__(self, message: str, exit_code: int = RUNTIME):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(TfcliError):
    def __init__(self, message: str):
        super().__init__(message, USAGE)


_AT_COMMAND_LINE = contextvars.ContextVar("at_command_line", default=False)


@contextlib.contextmanager
def command_line(on: bool = True):
    """Errors raised inside name settings by the CLI's flags (each command runs in it), or with
    `on=False` by their fields (a checkpoint's config, which no flag set)."""
    token = _AT_COMMAND_LINE.set(on)
    try:
        yield
    finally:
        _AT_COMMAND_LINE.reset(token)


def at_command_line() -> bool:
    return _AT_COMMAND_LINE.get()


_NO_VALUE = object()


def setting(field: str, value=_NO_VALUE, flag: str | None = None) -> str:
    """A setting, with its value if given, as the reader of the error spells it: `--n-layer 0` at
    the command line, `n_layer=0` in a notebook, where a message that said --lr left the reader to
    work out which argument it meant. `flag`: the CLI's name where it is not the field's (--time)."""
    if at_command_line():
        name = flag or "--" + field.replace("_", "-")
        return name if value is _NO_VALUE or value is True else f"{name} {value}"  # (a switch: --resume)
    return field if value is _NO_VALUE else f"{field}={value!r}"


def warn(message: str) -> None:
    """A Python warning (for a notebook: the CLI says its own) shown at the caller's line, the first
    outside tfcli: at tfcli's own, a notebook saw `tfcli/trainer.py:350` and a line of its source."""
    package, frame, level = os.path.dirname(os.path.abspath(__file__)), sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
