"""`tfcli info`: what a run is, how it was trained and how far it got, from its checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from .common import MODEL_HELP, handle_errors, load_native, stdout


def training_settings(s: dict) -> str:
    """A run's training settings in a line, so that runs can be told apart: 'muon, lr 0.006, batch
    32, bfloat16 on cpu, compiled, seed 1337'."""
    t = s["train"]
    parts = [t.get("optimizer", "adamw"), f"lr {t['lr']:g}", f"batch {t['batch_size']}"
             + (f" in {t['grad_accum']} micro-batches" if t.get("grad_accum", 1) > 1 else "")]
    if "dtype" in s:  # (runs from before these were recorded say only what was asked)
        processes = f" x {s['processes']} processes" if s.get("processes", 1) > 1 else ""
        parts.append(f"{s['dtype']} on {s['device']}{processes}")
        parts += ["compiled"] if s.get("compiled") else []
    return ", ".join(parts + [f"seed {t['seed']}"])


@handle_errors(torch=False)
def info(
    model_path: Optional[Path] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What a checkpoint holds: its config, size, vocabulary and training summary."""
    model = load_native(model_path)  # (no torch to import: 0.3 s rather than 2)
    record = {"path": str(model.path), "params": model.num_params(), "config": model.config.to_dict(),
              "vocab": model.vocab.chars, "summary": model.summary}
    if as_json:
        print(json.dumps(record))
        return
    from ..render import plural
    c, s = model.config, model.summary
    stdout.print(Text(str(model.path), style="bold"))
    stdout.print(f"  {model.num_params():,} parameters: {c.n_layer} layers, {c.n_head} heads, {c.n_embd:,} wide, "
                 f"context {c.block_size:,}, vocabulary {c.vocab_size:,}")
    stdout.print("  vocabulary: " + vocabulary_line(model.vocab.chars), markup=False)
    if s.get("step") is not None:
        val = f", val loss {s['val_loss']:.4f}" if s.get("val_loss") is not None else ""
        val += f" at step {s['val_step']}" if val and s.get("val_step") not in (None, s["step"]) else ""
        if s.get("best_step") not in (None, s["step"]) and s.get("best_val_loss") is not None:
            val += f"; best {s['best_val_loss']:.4f} at step {s['best_step']} (best.safetensors)"
        done = [plural(s["step"], "step")]  # best.safetensors keeps only its step and loss
        done += [f"{s['tokens']:,} tokens"] if "tokens" in s else []
        done += [f"{s['seconds']} s"] if "seconds" in s else []
        ended = ENDED.get(s.get("ended"), "")  # (an interrupted run showed no more than its step count)
        stdout.print(f"  trained {', '.join(done)}{val}{ended}", markup=False)
        if "train" in s:
            stdout.print(f"  with {training_settings(s)}", markup=False, highlight=False)


ENDED = {"steps": "; reached its --max-steps", "epochs": "; reached its epoch limit", "time": "; time budget spent",
         "interrupted": "; interrupted (train ... --resume goes on)",
         "running": "; saved at a validation, before the run ended"}
SHOWN_CHARS = 200  # a CJK or many-script vocabulary of 10,000 characters made one 43,000-character line


def vocabulary_line(chars: str) -> str:
    """The characters as they would print, format characters named by code point; a big vocabulary's
    first SHOWN_CHARS and how many more (`--json` has them all)."""
    from ..render.heatmap import INVISIBLE, visible

    shown = chars[:SHOWN_CHARS]
    hidden = [f"U+{ord(ch):04X}" for ch in shown if visible(ch) == INVISIBLE]  # (format characters)
    more = f" … and {len(chars) - SHOWN_CHARS:,} more (--json lists them all)" if len(chars) > SHOWN_CHARS else ""
    return "".join(visible(ch) for ch in shown) + more + (f" ({INVISIBLE}: {', '.join(hidden)})" if hidden else "")
