"""`tfcli` and `python -m tfcli`. A Ctrl-C while the CLI's modules load is an interruption
like any other (one line, exit 130), not a traceback from the middle of an import; output that
its encoding cannot hold is escaped, not a crash."""

import os
import sys


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a character the encoding lacks (⏎ in an ASCII locale, a
        if hasattr(stream, "reconfigure"):  # cp1252 console) prints escaped rather than ending the run
            stream.reconfigure(errors="backslashreplace")
    if sys.stdin is None:  # started with stdin closed (`<&-`): an empty stream, as from /dev/null
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - for the life of the process
    if sys.stdout is None or not sys.stdout.isatty():  # help piped or saved: click's plain text, not rich's
        os.environ.setdefault("TYPER_USE_RICH", "0")  # boxes (typer reads this when it is imported)
    try:
        from .cli import run
        run()  # (a Ctrl-C before a command starts, while typer builds its commands, lands here too)
    except KeyboardInterrupt:
        exit_interrupted()
    except Exception as e:
        from .stopping import interrupt_behind
        if interrupt_behind(e) is None:
            raise
        exit_interrupted()


def exit_interrupted() -> None:
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)


if __name__ == "__main__":
    main()
