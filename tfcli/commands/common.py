"""What every command shares: the two consoles, errors as one line and an exit code, the prompt
as given, and the model a command names (or the latest run).

A closed stdout (`| head`) is the reader being done, not a failure; a closed stderr is no one
left to tell. `handle_errors` turns every failure a user can cause into one line.
"""

from __future__ import annotations

import codecs
import errno
import functools
import io
import os
import re
import signal
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from .. import stopping
from ..errors import INTERRUPTED, USAGE, TfcliError, UsageError, command_line


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


_debug = False  # --debug: let an unexpected exception's traceback through


def show_tracebacks(on: bool) -> None:
    global _debug
    _debug = on


MODEL_HELP = "Run directory or .safetensors file (default: the latest run under ./runs)."


def torchrun_rank() -> str:
    """This process's rank under torchrun ("0" alone, or outside it), read here rather than by
    distributed.World, which would import torch for an error message."""
    return os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"


QUIET_RANK_WAIT_S = 1.0


def quiet_exit_delay() -> None:
    """A rank that leaves rank 0 to say the error waits a moment first: torchrun stops every process
    once one exits (it looks every 0.1 s), and could cut rank 0 off before it has said it. Its
    signal ends this wait, and the process, without a word (rank 0 has the word)."""
    with stopping.default_signals():
        time.sleep(QUIET_RANK_WAIT_S)


def fail(message: str, code: int, label: str = "error") -> None:
    """One error line, and the exit. Under torchrun a usage error from the flags is every process's,
    so rank 0 says it and torchrun ends the others while they wait; a rank still here after the wait
    met one of its own (a file only its machine lacks) and says it, naming its rank, as for other errors."""
    rank = torchrun_rank()
    if rank != "0" and code == USAGE:
        quiet_exit_delay()
    where = f"rank {rank}: " if rank != "0" else ""
    stderr.print(Text.assemble((f"{label}:", "bold red" if label == "error" else "bold"), " ",
                               where + message.replace("\n", " ")), soft_wrap=True)
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
            with term, command_line():
                import_whole(builds, "torch" if torch else "safetensors.numpy")
                result = fn(*args, **kwargs)
            if term.received:  # (a command that took SIGTERM's KeyboardInterrupt as its own Ctrl-C)
                raise stopping.Terminated
            return result
        except typer.Exit:
            raise
        except TfcliError as e:
            fail(e.message, e.exit_code)
        except KeyboardInterrupt as e:  # (sample re-raises a plain one once it has shown its text)
            interrupted(e, term)
        except BrokenPipeError:
            stop_writing_stdout()
            raise typer.Exit(0) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
            if (interrupt := stopping.interrupt_behind(e)) is not None:
                interrupted(interrupt, term)
            if _debug:
                raise
            if (short := out_of_memory(e)) is not None:
                less = {"sample": "fewer --num-samples, or a smaller model", "eval_": "a smaller --batch-size",
                        "train": "a smaller --batch-size or model", "bench": "fewer --shape"}
                fail(f"out of memory: {short}; ask for less ({less.get(fn.__name__, 'a smaller model')})", 1)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):  # (`> /dev/full`)
                fail(f"cannot write{f' {e.filename}' if e.filename else ''} ({os.strerror(e.errno).lower()})", 1)
            if isinstance(e, UnicodeEncodeError) and e.encoding.replace("-", "").lower() != "utf8":
                fail(f"the output's encoding ({e.encoding}) cannot write {e.object[e.start:e.end]!r}; "
                     "set PYTHONIOENCODING=utf-8 or use a UTF-8 locale", 1)
            if "WORLD_SIZE" in os.environ and any(gone in str(e) for gone in PEER_GONE):  # (under torchrun)
                fail("another process of this torchrun job has ended (its error, if it met one, is above)", 1)
            fail(f"{type(e).__name__}: {e} (rerun as 'tfcli --debug ...' for the traceback)", 1)
    return wrapper


# what gloo and NCCL say when the process at the other end of a collective has gone (a two-line
# RuntimeError naming a C++ source line, "This is typically caused by a remote worker crashing")
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def interrupted(e: KeyboardInterrupt, term: stopping.TermAsInterrupt) -> None:
    """The exit for a Ctrl-C, or for SIGTERM (which `term` turned into one); `e`'s message, if it has
    one, is what the command adds (what it left on disk). Not called an error: the user asked for it."""
    if term.received or isinstance(e, stopping.Terminated):
        fail(str(e) or "the command stopped", 128 + signal.SIGTERM, label="terminated")
    fail(str(e) or "the command stopped", INTERRUPTED, label="interrupted")


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

    from .. import native

    if module in sys.modules or "torch" in sys.modules or not hasattr(signal, "pthread_sigmask"):
        native.prepare(*builds)
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        native.prepare(*builds)
        importlib.import_module(module)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        if str(prompt_file) == "-":
            return read_stdin()
        try:  # line ends as written: the vocabulary decides how \r reads (`Vocab.spelt_as_known`), as on stdin
            with prompt_file.open(encoding="utf-8-sig", newline="") as f:
                return f.read()
        except UnicodeDecodeError as e:  # (Python's own words named a codec and a "continuation byte")
            at = e.start + bom_length(prompt_file)  # (utf-8-sig counts from after the byte-order mark)
            raise UsageError(f"{prompt_file}: the prompt is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{at:,}); save it as UTF-8") from None
        except OSError as e:
            raise UsageError(f"{prompt_file}: cannot read prompt ({e.strerror or e})") from None
    if prompt == "-":
        return read_stdin()
    return from_argv(prompt or "", "--prompt")


def from_argv(text: str, flag: str) -> str:
    """A command-line argument as the UTF-8 it was typed in: in a locale Python reads as ASCII (LC_ALL=C
    without UTF-8 mode) "café" arrived as "caf\udcc3\udca9", and was called characters the model lacks."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{flag} is not valid UTF-8 (the terminal's encoding?)") from None


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


def bom_length(path: Path) -> int:
    """The bytes of a UTF-8 byte-order mark that `path` starts with (0 or 3)."""
    try:
        with path.open("rb") as f:
            return len(codecs.BOM_UTF8) if f.read(3) == codecs.BOM_UTF8 else 0
    except OSError:
        return 0


def fit_prompt(vocab, prompt: str, unknown: str, hint: str = "", starts_text: bool = False) -> str:
    """Apply the --unknown policy (Vocab.fit), warning on stderr of what it dropped or replaced
    (`starts_text`: and that the text starts from nothing, where that was the whole prompt)."""
    escape = typed_escape(prompt, vocab)
    try:
        prompt, changed = vocab.fit(prompt, unknown)
    except UsageError as e:
        raise UsageError(e.message + (escape or hint)) from None
    if not changed:
        return prompt
    from ..corpus import show_char
    left = " (all the prompt had: the text starts from nothing)" if starts_text and not prompt else ""
    # (a character with no look-alike is dropped: said so, not "replaced"; skip may keep part of one, Ü spelt
    # U + ¨ where only the ¨ is unknown)
    mapped = ", ".join(f"{show_char(c)}→{''.join(map(show_char, r))}" for c, r in changed.items() if r)
    gone = " ".join(show_char(c) for c, r in changed.items() if not r)
    if unknown == "skip":
        said = "; ".join([f"dropped unknown characters: {gone}"] * bool(gone)
                         + [f"kept what the model knows of: {mapped}"] * bool(mapped))
    else:
        said = "; ".join([f"replaced unknown characters: {mapped}"] * bool(mapped)
                         + [f"dropped unknown characters with no look-alike in the vocabulary: {gone}"] * bool(gone))
    stderr.print(f"warning: {said}{left}{escape}", markup=False)
    return prompt


def say_which(asked: Path | None, found: Path) -> None:
    """Where tfcli chose the run (no -m, or -m naming a directory of runs), say which on stderr."""
    if asked is None or (asked.is_dir() and found.parent.resolve() != asked.resolve()):
        stderr.print(f"using {found.parent}", style="dim", highlight=False, markup=False)


def load(model_path: Path | None, device: str = "cpu"):
    from ..checkpoint import load_model
    import_whole()  # (for a command that held off: see load_sampler)
    model = load_model(model_path, device)
    say_which(model_path, model.path)
    return model


def load_native(model_path: Path | None, say: bool = True):
    """The checkpoint read without PyTorch (`native_decoder.NativeModel`), checked as `load` checks it."""
    from ..native_decoder import NativeModel
    model = NativeModel.load(model_path)
    if say:
        say_which(model_path, model.path)
    return model


def typed_escape(text: str, vocab, prompt: bool = True) -> str:
    """A hint where `text` holds a backslash escape the shell passed as typed: '--stop "\\n"' is a
    backslash and an n, not a line end (the error named only the backslash, and --unknown skip
    made 'Moon\\nRiver' into 'MoonnRiver')."""
    if "\\" in vocab.chars or not re.search(r"\\[ntr]", text):
        return ""
    return (" (\\n in quotes is a backslash and an n, not a line end: in bash write $'\\n'"
            + (", or use --prompt-file)" if prompt else ")"))


def print_view(view, width: int | None = None) -> None:
    """A view on stdout; in a pipe or file, its lines (`width` wide, else the console's) without the
    trailing spaces that pad its columns (noise to whatever reads them; a terminal shows the same)."""
    if stdout.is_terminal:
        stdout.print(view)
        return
    plain = QuietConsole(file=io.StringIO(), width=width or stdout.width, color_system=None, highlight=False)
    plain.print(view)
    stdout.file.write("".join(line.rstrip() + "\n" for line in plain.file.getvalue().splitlines()))
