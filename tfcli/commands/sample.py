"""`tfcli sample`: the prompt as given, the model, and the text streamed as it comes.

One sample streams to the terminal (plain to a pipe); a batch shows a line per sample while it
grows. `--interactive` hands over to the REPL (tfcli/repl.py).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from ..config import SampleConfig, with_overrides
from ..errors import UsageError
from .common import (
    MODEL_HELP,
    fit_prompt,
    from_argv,
    handle_errors,
    load,
    load_native,
    read_prompt,
    say_which,
    stderr,
    stdout,
    typed_escape,
)


def load_sampler(model_path: Path | None, device: str, cfg: SampleConfig):
    """The model `sample` decodes with: on a CPU where tfcli's C kernels take the step, read
    without PyTorch (`native_decoder.NativeModel`: the first character came 0.5 s after enter
    rather than 2.5 s, most of it `import torch`), else PyTorch's."""
    from .. import native_decoder
    from ..sampling import decode_dtype

    if device != "cpu" or cfg.num_samples > native_decoder.MANY_ROWS or not native_decoder.kinds():
        return load(model_path, device)
    model = load_native(model_path, say=False)
    if not native_decoder.runs(decode_dtype(model, cfg.num_samples, cfg.dtype), cfg.num_samples):
        model = load(model.path, device)  # (the path found: say which, below)
    say_which(model_path, model.path)
    return model


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
    dtype: str = typer.Option("auto", help="Weights while sampling: auto (float16 for 1-2 samples of CPU models "
                              "over 8 MB; bfloat16 for batches of 3+ where the CPU has it natively; else "
                              "float32), float32, float16 or bfloat16."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps or auto."),
    interactive: bool = typer.Option(False, "--interactive", "-i",
                                     help="Keep going: type text to add, the model continues after each line; "
                                     "/help lists the commands (/temp, /top, /undo...)."),
) -> None:
    """Generate text from a trained model.

    Filters apply in this order: repeat/presence/frequency penalties, top-k, top-p, min-p, then temperature.
    """
    from ..corpus import check_unknown
    from ..render.sample import prob_legend, styled
    from ..sampling import check_batch_fits, collect, generate_pieces, is_greedy, new_seed

    check_unknown(unknown)
    if hasattr(sys.stdout, "reconfigure"):  # the text is what the command makes: an error, not escapes,
        sys.stdout.reconfigure(errors="strict")  # where the output's encoding cannot hold it (see __main__)
    if interactive:
        check_interactive(num_samples, as_json, stream, prompt, prompt_file)
    if logprobs and not as_json:
        raise UsageError("--logprobs goes with --json (use --color-by-prob to see probabilities as colours)")
    if color_by_prob and as_json:  # (it was silently ignored)
        raise UsageError("--color-by-prob colours text on a terminal; with --json, --logprobs gives the numbers")
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, top_p=top_p,
                       min_p=min_p, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                       seed=None if seed == -1 else seed, num_samples=num_samples,
                       stop=tuple(from_argv(s, "--stop") for s in stop or ()), compile=compile_, dtype=dtype).validate()
    text = read_prompt(prompt, prompt_file)
    model = load_sampler(model_path, device, cfg)
    check_batch_fits(model.config, cfg.num_samples)  # (before a row per sample is made)
    text = fit_prompt(model.vocab, text, unknown, " (or pass --unknown skip|replace)", starts_text=True)
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
    if compile_ and (why := compile_unused(model, cfg)):
        stderr.print(f"note: {why}", style="dim", highlight=False)
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

    from ..render.sample import batch_progress
    from ..sampling import Aligned, collect

    rows = [Aligned() for _ in range(n)]
    width, height = stdout.size

    def view():
        return batch_progress(prompt, [row.tail(width) for row in rows], width, height)
    with Live(console=stdout, transient=True, refresh_per_second=8, get_renderable=view):
        return collect(pieces, n, rows)


def compile_unused(model, cfg) -> str | None:
    """Why --compile will not be used, if it will not."""
    from ..sampling import native_decodes, on_cpu

    if cfg.num_samples > 1:
        return "--compile applies to single samples; a batch decodes faster uncompiled"
    if native_decodes(model, 1, cfg):
        return "--compile is not used on a CPU where tfcli's C decode kernel runs: it is faster uncompiled"
    from ..device import can_compile  # (imports torch, which a compiled step needs anyway)
    if on_cpu(model) and not can_compile():  # (the model's device: --device auto picks the CPU too)
        return ("--compile needs a C++ compiler on a CPU (g++, c++ or clang++) and none was found: "
                "sampling uncompiled")
    return None


def warn_unmatchable_stops(stops: tuple[str, ...], vocab) -> None:
    """A stop string holding a character the model cannot write never matches: say so, not run to -n.
    Checked as sampling matches it, in the vocabulary's spelling: a composed é against a text that
    spells it e + ´ was said never to match, and did."""
    from ..corpus import show_char
    for stop in stops:
        unknown = list(vocab.fit(stop, "skip")[1])  # (named as typed: è, not its bare accent)
        if unknown:
            stderr.print(f"warning: --stop {stop!r} can never match: the model never writes "
                         f"{', '.join(show_char(c) for c in unknown)}{typed_escape(stop, vocab, prompt=False)}",
                         highlight=False, markup=False)


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
    from ..render.sample import for_terminal

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
    from ..render.sample import for_terminal, styled
    from ..sampling import Aligned

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
        from ..render.sample import prob_style

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
    from ..repl import Session, read_lines

    out = ReplOutput(color_by_prob)
    fit = functools.partial(fit_prompt, model.vocab, unknown=unknown, hint=" (or start with --unknown skip|replace)")
    session = Session(model, cfg, out, prompt, seed=cfg.seed, fit=fit)
    if out.screen:
        stderr.print("type text to continue it, /help for commands, Ctrl-D to quit", style="dim", highlight=False)
    session.run(read_lines("> " if out.screen else "", before=lambda: out.new_line(out.screen)))
    out.new_line(True)
