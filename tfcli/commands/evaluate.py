"""`tfcli eval`: a model's loss on a text, in a full pass, with progress for a long one."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .common import MODEL_HELP, handle_errors, load, stderr, stdin_hint, stdout


@contextlib.contextmanager
def progress(total: int, what: str, unit: str, every: float = 30.0):
    """An update(n) for long work: a tqdm bar on a terminal's stderr; elsewhere (a log, a pipe) a
    plain line every `every` seconds, so a run of many minutes does not look hung."""
    from tqdm import tqdm

    if sys.stderr.isatty():
        with tqdm(total=total, unit=unit, unit_scale=True, desc=what, leave=False) as bar:
            yield bar.update
        return
    from ..render.progress import fmt_count, fmt_time
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


def held_batch(model, batch_size: int | None, chars: int) -> int:
    """The windows a forward scores, with a note where free memory holds fewer than --batch-size
    asked for (and the text has)."""
    from ..evaluation import batch_windows
    from ..render import plural

    rows = batch_windows(model.config, batch_size, next(model.parameters()).device)
    if batch_size and rows < min(batch_size, chars // model.config.block_size):
        stderr.print(f"note: scoring {plural(rows, 'window')} at a time, what half the free memory holds, not "
                     f"--batch-size {batch_size:,}", highlight=False, markup=False)
    return rows


@handle_errors
def eval_(
    file: list[Path] = typer.Argument(..., help="Held-out text files ('-': stdin).", metavar="FILE",
                                      show_default=False),
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    batch_size: Optional[int] = typer.Option(None, help="Windows scored at once (on a CPU, no more than half "
                                             "the free memory holds) [default: 8,192 characters' worth].",
                                             show_default=False),
    as_json: bool = typer.Option(False, "--json", help='Print {"chars", "loss", "bpc", "perplexity"}.'),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N, mps or auto."),
    encoding: str = typer.Option("utf-8", help="Text encoding of the files."),
    errors: str = typer.Option("strict", help="On undecodable bytes: strict (refuse) or replace."),
    unknown: str = typer.Option("error", help="Characters the model never saw: error, or skip (drop them and "
                                "score the rest)."),
    max_chars: Optional[int] = typer.Option(None, help="Score only the first N characters: a quick figure for a "
                                            "huge text, which is read no further [default: all]."),
) -> None:
    """Loss on held-out text: every character scored once, in windows of the model's context."""
    from collections import Counter

    from ..corpus import encode_text, show_char
    from ..evaluation import evaluate
    from ..render import plural

    if batch_size is not None and batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if errors not in ("strict", "replace"):
        raise UsageError(f"--errors must be strict or replace, got {errors!r}")
    if unknown not in ("error", "skip"):
        raise UsageError(f"--unknown must be error or skip, got {unknown!r}")
    if max_chars is not None and max_chars <= 0:
        raise UsageError(f"--max-chars must be positive, got {max_chars}")
    model = load(model_path, device)
    skipped = Counter() if unknown == "skip" else None
    if any(str(f) == "-" for f in file):
        stdin_hint("the text")
    ids = encode_text(file, model.vocab, encoding, errors, skipped, None if max_chars is None else max_chars + 1)
    counted = {} if skipped is None else {"skipped_chars": skipped.total()}  # (for --json's reader)
    if skipped:
        top = ", ".join(f"{show_char(c)} ×{n:,}" for c, n in skipped.most_common(5))
        stderr.print(f"note: skipped {plural(sum(skipped.values()), 'character')} the model never saw ({top}"
                     f"{', …' if len(skipped) > 5 else ''})", highlight=False, markup=False)
    if len(ids) < 2:
        raise UsageError("need at least two characters to evaluate")
    rows = held_batch(model, batch_size, len(ids) - 1)
    try:
        with progress(len(ids) - 1, "eval", "char") as update:
            result = evaluate(model, ids, rows, on_progress=update)
    except KeyboardInterrupt as e:  # (its type kept: a SIGTERM's exits 143)
        if (part := getattr(e, "partial", None)) is None:
            raise
        if as_json:  # (a script reads stdout: it got nothing)
            print(json.dumps({**part.to_dict(), **counted, "interrupted": True, "of_chars": len(ids) - 1}),
                  flush=True)
        raise type(e)(f"scored {part.chars:,} of {len(ids) - 1:,} chars before the stop: loss {part.loss:.4f} "
                      f"nats/char, {part.bpc:.4f} bits/char on those") from None
    if as_json:
        print(json.dumps({**result.to_dict(), **counted}))
    else:
        stdout.print(f"{plural(result.chars, 'char')}: loss {result.loss:.4f} nats/char, {result.bpc:.4f} bits/char, "
                     f"perplexity {result.perplexity:.3f}")
