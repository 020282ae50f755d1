"""The one exception users see.

Problems are raised where they are found, as a `TfcliError` carrying a one-line
message and an exit code; only the CLI (commands/common.py) turns it into text, so the library stays
usable from a notebook (where a traceback is the right thing to show).
"""

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
