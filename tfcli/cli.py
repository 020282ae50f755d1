"""The `tfcli` command: one Typer app over the commands in tfcli/commands/.

Nothing heavy is imported at module level, so `tfcli --help` answers without loading torch.
Every failure a user can cause becomes one line on stderr and an exit code (commands/common.py);
Typer's own usage errors do too, here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from rich.text import Text

from .commands import bench, common, evaluate, info, inspect_attention, sample, train
from .commands.common import quiet_exit_delay, stderr, torchrun_rank
from .errors import INTERRUPTED


def _no_python_types_in_help() -> None:
    """Typer 0.29's help gave an on/off flag a value placeholder (`--json <bool>`), as if it took one,
    and an argument its annotation (`CORPUS <list[Path]>`), where its name and help say what it is."""
    from typer.core import TyperArgument, TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is not None:
        TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)
    if getattr(TyperArgument, "display_type_rich", None) is not None:
        TyperArgument.display_type_rich = lambda self, ctx: None


_no_python_types_in_help()


app = typer.Typer(name="tfcli", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="rich", context_settings={"help_option_names": ["-h", "--help"]},
                  help="Train a character-level transformer on any text, sample from it, and look inside it.")


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
    common.show_tracebacks(debug)


# (each module's function is the command: its signature is the interface)
def _command(function, name: str | None = None) -> None:
    """Each command's summary is its docstring's first line, whole: in a pipe, `tfcli --help` cut
    them at 45 characters ("Train a model on CORPUS; progress live on a...")."""
    app.command(name, short_help=(function.__doc__ or "").strip().partition("\n")[0] or None)(function)  # (-OO: none)


_command(train.train)
_command(sample.sample)
_command(inspect_attention.inspect_attention, "inspect-attention")
_command(evaluate.eval_, "eval")
_command(info.info)
_command(bench.bench)


def _plain_help() -> None:
    """Help texts escape [ for rich's markup; click's plain help (piped: see __main__) shows them as typed."""
    import inspect

    import typer.core
    import typer.models

    if typer.core.HAS_RICH:
        return
    for command in app.registered_commands:
        for param in inspect.signature(command.callback).parameters.values():
            option = param.default
            if isinstance(option, typer.models.ParameterInfo) and option.help:
                option.help = option.help.replace("\\[", "[")


PROMPTED = ("sample", "inspect-attention")  # commands whose text is an option's (-p), not an argument


def stray_hint(command: str | None, message: str, argv: list[str]) -> str | None:
    """What an argument too many most likely meant, for the commands whose text comes with -p (a
    user who knows `eval -` typed `sample -`): a model without its -m, a prompt without its -p,
    or one of several words without quotes. None where it looks like none of these."""
    found = re.search(r"unexpected extra argument(?:s|\(s\))? \((.*)\)$", message)
    if command not in PROMPTED or found is None:
        return None
    extra = found.group(1).split(" ")
    if extra == ["-"]:
        return " (a prompt goes after -p, and -p - reads it from stdin)"
    if len(extra) == 1 and Path(extra[0]).exists():
        return f" (a model goes after -m, as in -m {extra[0]})"
    if any(a.lstrip("-").replace(".", "", 1).isdigit() for a in extra):
        return None  # (a number: a value given twice, or to the wrong option)
    if "-p" in argv or "--prompt" in argv:
        return f" (quote a prompt of several words, as in -p '... {' '.join(extra)}')"
    return " (a prompt goes after -p, as in -p 'ROMEO:')"


def run() -> None:
    """The `tfcli` command. Typer's own usage errors (an unknown option, a missing argument) come
    out as one line, like tfcli's, rather than in its four-line box."""
    import typer.core

    click = getattr(typer.core, "_click", None) or typer.core.click  # typer 0.29 vendors click; older ones import it

    _plain_help()
    try:
        code = app(standalone_mode=False)
    except SystemExit as e:  # click's exit 1 when help meets a closed pipe (`tfcli --help | true`): the
        if e.code != 1 or not isinstance(e.__context__, BrokenPipeError):  # reader is done, as for `sample`
            raise
        code = 0
    except click.exceptions.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # its message is the help: rich has printed it, plain has not
            if e.format_message():
                print(e.format_message().rstrip("\n"))
        elif torchrun_rank() == "0":  # (under torchrun rank 0 says what is wrong with the flags)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            hint = stray_hint(ctx.info_name if ctx is not None else None, e.format_message(), sys.argv) or hint
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
