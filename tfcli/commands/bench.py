"""`tfcli bench`: training and sampling speed on this machine, for the shapes of tfcli/bench.py."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from ..errors import UsageError
from .common import handle_errors, print_view, stderr, stdout


@handle_errors
def bench(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile",
                                            help="torch.compile the training step \\[default: as a 5-minute train "
                                                 "does]."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="SHAPE",
                                              help="Only these shapes: 0.8M, 4.8M, 10.7M."),
    seconds: float = typer.Option(6.0, help="Timed seconds per training shape, after warm-up "
                                                       "and any compile (a cold one: ~15-25 s a shape)."),
) -> None:
    """Training tokens/s and sampling chars/s at nanoGPT's three model shapes."""
    from .. import bench as b

    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"--seconds must be a positive number of seconds, got {seconds}")
    unknown = [s for s in shape or [] if s not in b.SHAPES]
    if unknown:
        raise UsageError(f"unknown --shape {unknown[0]!r}; choose from {', '.join(b.SHAPES)}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    def stage(what: str) -> None:
        stderr.print(f"bench: {what}…", style="dim", highlight=False)
    result = b.run(device, dtype, compile_, shape or None, seconds, on_stage=stage)
    if as_json:
        print(json.dumps(result))
        return
    print_view(bench_table(result, plain=not stdout.is_terminal), width=200)  # (a pipe: no line cut to 80)


def bench_table(result: dict, plain: bool):
    """The result as a table that fits 80 columns (a column nothing was measured for is left out);
    `plain` (a pipe or file): without a box."""
    from rich import box
    from rich.table import Table

    how = "compiled" if result["compile"] else "uncompiled"
    t = Table(title=f"tfcli bench: {result['device']}; training in {result['dtype']}, {how}; "
                    f"peak {result['peak_gflops']:.0f} GFLOP/s (probed)",
              box=None if plain else box.SIMPLE_HEAD, title_justify="left", caption_justify="left", pad_edge=False)
    columns = {"shape": [], "params": [], "train\ntok/s": [], "GFLOP/s\n(% peak)": [], "sample chars/s\n(weights)": [],
               "--compile\nchars/s": [], "16 samples\n(x time)": [], "first\nchar": []}
    for name, r in result["train"].items():
        s = result["sample"].get(name, {})
        batch = f"{s['num_samples_16_cost']:.1f}x" if "num_samples_16_cost" in s else "–"
        if s.get("num_samples_16_dtype", s.get("dtype")) != s.get("dtype"):  # (a batch's own weights)
            batch += f" ({_short(s['num_samples_16_dtype'])})"
        row = [name, f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:,.0f}",
               f"{r['gflops']:.0f} ({r['peak_fraction']:.0%})",
               f"{s['chars_per_s']:,.0f} {_short(s['dtype'])}" if s else "–",
               f"{s['compiled_chars_per_s']:,.0f}" if "compiled_chars_per_s" in s else "–", batch,
               f"{s['first_char_s']:.2f} s" if "first_char_s" in s else "–"]
        for values, value in zip(columns.values(), row):
            values.append(value)
    shown = {head: values for i, (head, values) in enumerate(columns.items()) if i < 4 or set(values) != {"–"}}
    for head in shown:
        t.add_column(head, justify="right", overflow="fold")  # (a figure too wide is folded, never cut)
    for row in zip(*shown.values()):
        t.add_row(*row)
    if result["sample"]:
        t.caption = ("sampling attends through tfcli's C kernel (float16 keys and values with half weights)"
                     if result["decode_kernel"]
                     else "sampling attends through PyTorch (tfcli's C kernel is off or could not be built)")
        if result.get("decode_matmul"):
            t.caption += f"; half weights multiply in C ({', '.join(result['decode_matmul'])})"
        if "--compile\nchars/s" not in shown:
            t.caption += "; --compile is measured only where sampling uses it (no C kernel, --compile on)"
        t.caption += "; x time: 16 samples at once, against one's time"
    return t


def _short(dtype: str) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
