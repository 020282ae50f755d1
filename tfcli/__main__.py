"""`tfcli` and `python -m tfcli`. A Ctrl-C while the CLI's modules load is an interruption
like any other (one line, exit 130), not a traceback from the middle of an import."""

import sys


def main() -> None:
    try:
        from .cli import run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
