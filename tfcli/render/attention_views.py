"""Views of attention analyses: head-pattern tables, the logit lens, and generated text.

Built like ``heatmap``'s views: ``no_wrap`` Text lines of fixed width, characters drawn in
2-cell columns (so wide CJK glyphs align), ``color=False`` emits no styles at all.
``export`` writes any of these renderables (or a heatmap) as an SVG or HTML document.
"""

from __future__ import annotations

import html
import io
import math
from pathlib import Path

import numpy as np
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.text import Text

from ..checkpoint import atomic_write
from ..inspect import DIFFUSE_ENTROPY, GENERATE_TEMPERATURE, LOCAL_WINDOW, PATTERNS, Generation, HeadPattern, Lens
from .heatmap import _fit, _header_glyph, _line, _prose, _rgb, visible

_SHORT = {"previous": "prev", "current": "cur", "first": "first", "duplicate": "dup", "induction": "ind",
          "local": "local"}
MEANINGS = (
    "previous: the char before   current: itself   first: position 0 (a sink)",
    f"duplicate: earlier copies of the same char   local: itself and the {LOCAL_WINDOW - 1} before",
    "induction: the char after an earlier copy of this one (see the probe)",
    "entropy: 0 = one key, 1 = spread evenly   mixed: none of these",
)


def _note(s: str, color: bool, max_width: int = 80) -> Text:
    """A line of explanation: wrapped at spaces on a narrow terminal (a cut one lost the words
    that explain), as the heatmaps' notes are; `max_width` is the console's, which wraps it."""
    return _prose(Text(s, style="dim" if color else ""))


def _tail(s: str, width: int) -> str:
    """The end of ``s`` in at most ``width`` cells, an ellipsis marking a cut (long prompts: the end matters)."""
    if cell_len(s) <= width:
        return s
    kept = ""
    for c in reversed(s):
        if cell_len(c + kept) > width - 1:
            break
        kept = c + kept
    return "…" + kept


def _num(x: float) -> str:
    return "  –  " if not math.isfinite(x) else f"{x:5.2f}"


def _pattern_table(patterns: list[HeadPattern], title: str, color: bool, max_width: int) -> list[Text]:
    """A row per head: its label, then a column per pattern score and the entropy. Where the
    columns do not fit `max_width` they go in blocks, one under the other, each with the heads and
    labels again (a terminal cropped them: below ~55 columns the induction and entropy scores
    were lost)."""
    bold = "bold" if color else ""
    head_w = max(len(f"L{p.layer} H{p.head}") for p in patterns)
    columns = [(f"{_SHORT[n]:>6}", lambda p, n=n: (f" {_num(p.scores[n])}", p.label == n)) for n in PATTERNS]
    columns.append((f"{'entropy':>8}", lambda p: (f"   {_num(p.entropy)}", p.label == "diffuse")))
    room, blocks = max_width - head_w - 11, [[]]
    for column in columns:
        if blocks[-1] and sum(len(h) for h, _ in blocks[-1]) + len(column[0]) > room:
            blocks.append([])
        blocks[-1].append(column)
    lines = [_line(Text(_fit(title, max_width), style=bold))]
    for block in blocks:
        lines += [_line("")] if len(lines) > 1 else []
        lines.append(_line(f"{'':{head_w}}  {'label':<9}" + "".join(h for h, _ in block)))
        for i, p in enumerate(patterns):
            if i and p.layer != patterns[i - 1].layer:
                lines.append(_line(""))
            row = _line(f"{f'L{p.layer} H{p.head}':<{head_w}}  ", Text(f"{p.label:<9}", style=bold))
            for _, cell in block:
                text, picked = cell(p)
                row.append(text, style="bold reverse" if picked and color else "")
            lines.append(row)
    return lines


def summary_view(on_prompt: list[HeadPattern], on_probe: list[HeadPattern], prompt: str, probe_len: int,
                 threshold: float, *, color: bool = True, max_width: int = 80,
                 scope: str = "on the prompt") -> RenderableType:
    """Each head's label and pattern scores, on the prompt (or the part `scope` names) and on the
    repeated random probe."""
    shown = "".join(visible(c) for c in prompt)
    lines = [_note("head patterns: a score is the mean share of attention on the pattern's keys;", False, max_width),
             # (inspect._label's order: a pattern that names its keys outranks local, which any head near
             # its query scores well on)
             _note(f"label = the highest of prev, cur, first, dup and ind if ≥ {threshold:.2f},", False, max_width),
             _note(f"else diffuse if entropy ≥ {DIFFUSE_ENTROPY:.2f}, else local if local ≥ {threshold:.2f}, "
                   "else mixed", False, max_width), _line("")]
    lines += _pattern_table(on_prompt, f"{scope}: {shown}", color, max_width)
    lines += [_line("")]
    lines += _pattern_table(on_probe, f"on the probe: {probe_len} random characters, then the same again",
                            color, max_width)
    lines += [_line(""), *(_note(m, color, max_width) for m in MEANINGS)]
    return Group(*lines)


def lens_view(lens: Lens, chars: str, *, offset: int = 0, color: bool = True, max_width: int = 80) -> RenderableType:
    """Per stage of the residual stream, the likeliest next characters (the logit lens): as many
    as fit `max_width`, so a narrow terminal loses candidates, never digits."""
    bold = "bold" if color else ""
    title = f"logit lens at position {offset + lens.at} {visible(chars[lens.at])}"
    if lens.actual is not None:
        title += f" (next in the prompt: {visible(lens.actual)})"
    stage_w = max(len(s) for s in lens.stages)
    room = max_width - stage_w - 2 - (5 if lens.actual_p else 0)
    k = max(1, min(len(lens.top[0]), room // 9))
    label = next(t for t in ("likeliest next characters", "likeliest next", "next", "") if len(t) < 9 * k)
    lines = [_prose(Text(title, style=bold)),
             _line(f"{'':{stage_w}}  {label:<{9 * k}}"
                   + (f"p({visible(lens.actual)})" if lens.actual is not None else ""))]
    for i, (stage, top) in enumerate(zip(lens.stages, lens.top)):
        row = _line(f"{stage:<{stage_w}}  ")
        for c, p in top[:k]:
            row.append(Text(_header_glyph(c), style=bold if c == lens.actual else ""))
            row.append(Text(f"{p:5.2f}  ", style=_rgb(p) if color else ""))
        if lens.actual_p:
            row.append(f"{lens.actual_p[i]:5.2f}")
        lines.append(row)
    lines.append(_note("embed: the embedding alone; Ln: after block n (the last row is the output)", color))
    return Group(*lines)


_MOST_ATTENDED = ("most-attended earlier characters (position, weight)", "most-attended (position, weight)",
                  "most-attended")  # the longest that fits: a narrow terminal cut the first mid-word


def generated_view(gen: Generation, weights: list[np.ndarray], what: str, *, color: bool = True,
                   max_width: int = 80) -> RenderableType:
    """For each generated character, the earlier characters its query attended to most.

    ``weights[i]`` is step i's attention over its keys, already aggregated over heads/layers.
    """
    bold = "bold" if color else ""
    prompt, made = gen.text[:gen.start], gen.text[gen.start:]
    made = "│" + "".join(visible(c) for c in made)
    head = Text("text: ", no_wrap=True)
    head.append(_tail("".join(visible(c) for c in prompt), max_width - 6 - cell_len(made)), style=bold)
    head.append(made)
    digits = len(str(len(gen.text) - 1))
    item = 2 + 1 + digits + 1 + 4 + 2  # glyph, position, weight, gap
    prefix = digits + 2 + 2 + 6 + 2
    top = max(1, min(5, (max_width - prefix) // item))
    columns = f"{'pos':>{digits}}  ch     p  "
    label = next((lab for lab in _MOST_ATTENDED if cell_len(columns + lab) <= max_width), _MOST_ATTENDED[-1])
    lines = [_line(head), _line(_fit(f"attention that produced each character ({what})", max_width)),
             _line(columns + label)]
    for step, w in zip(gen.steps, weights):
        row = _line(f"{step.index:>{digits}}  ", Text(_header_glyph(step.char), style=bold), f" {step.p:5.2f}  ")
        order = np.argsort(-w[::-1], kind="stable")[:top]  # ties: the more recent key first
        for r in order:
            pos = step.keys_from + len(w) - 1 - int(r)
            weight = float(w[len(w) - 1 - int(r)])
            row.append(_header_glyph(gen.text[pos]) + f" {pos:>{digits}} ")
            row.append(Text(f"{weight:4.2f}", style=_rgb(weight) if color else ""))
            row.append("  ")
        lines.append(row)
    lines.append(_note(f"p: its probability before temperature ({GENERATE_TEMPERATURE:g}). Where it looked, not why.",
                       color, max_width))
    return Group(*lines)


EXPORT_SUFFIXES = (".svg", ".html", ".json")


def export(renderable: RenderableType, path: Path, *, width: int, title: str) -> None:
    """Write ``renderable`` as an SVG or HTML document, drawn as a ``width``-column terminal."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system="truecolor",
                      force_terminal=True, legacy_windows=False)
    console.print(renderable)
    title = "".join(c if c == " " else visible(c) for c in title)  # a control char would make invalid XML
    if path.suffix.lower() == ".svg":
        text = console.export_svg(title=title)
    else:  # rich's page has no <title>, which HTML requires
        text = console.export_html().replace("<head>", f"<head>\n<title>{html.escape(title)}</title>", 1)
    atomic_write(path, text.encode("utf-8"))  # (a full disk leaves an earlier file whole)
