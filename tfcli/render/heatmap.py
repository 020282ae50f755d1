"""Terminal attention heatmaps: numbers in, rich renderables out.

Key decisions:
- Every view returns a ``rich.console.Group`` of ``no_wrap`` Text lines whose width is fixed by
  construction (measured with ``rich.cells.cell_len``), so rich never wraps a row.
- Heatmap colours are scaled from 0 to the largest unmasked weight *shown* (legend says so);
  focus bars use the fixed 0..1 scale, since a weight there is read as a share of attention.
- Causal masking is positional (key after query), not inferred from zero values, so a real
  weight of 0 and a masked cell look different.
- ``color=False`` emits no styles at all (NO_COLOR-safe) and shades with `` ░▒▓█``.
"""

from __future__ import annotations

import unicodedata

import numpy as np
from rich.cells import cell_len, set_cell_size
from rich.console import Group, RenderableType
from rich.text import Text

# Viridis sampled at 0, .25, .5, .75, 1: perceptually uniform and readable on dark/light themes.
_STOPS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)
_SHADES = " ░▒▓█"
_EIGHTHS = " ▏▎▍▌▋▊▉"
MASKED = "·"
INVISIBLE = "◌"  # Unicode's own placeholder for a character with no form of its own (not MASKED: a learner
# reading a header must not take a zero-width joiner for the masked future)
_GAP = 2
_BAR_WIDTH = 20
_NAMED = {" ": "␣", "\n": "⏎", "\t": "⇥", "\x7f": "␡"}


def visible(c: str) -> str:
    """How a character should appear in a header: whitespace and control chars made visible."""
    if c in _NAMED:
        return _NAMED[c]
    if len(c) == 1 and ord(c) < 0x20:
        return chr(0x2400 + ord(c))  # Unicode "control pictures" block
    if not c.isprintable():
        return INVISIBLE  # format characters: joiners, bidi controls, zero-width space
    if cell_len(c) == 0:  # a bare combining mark has no width; give it a base so it stays visible
        # (any mark: most Indic and Thai vowel signs have combining class 0; a variation selector
        # has nothing to show)
        return INVISIBLE + c if unicodedata.category(c).startswith("M") and not _selector(c) else INVISIBLE
    return c


def _selector(c: str) -> bool:
    return "\ufe00" <= c <= "\ufe0f" or "\U000e0100" <= c <= "\U000e01ef"


def _rgb(t: float) -> str:
    t = min(max(float(t), 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(t), len(_STOPS) - 2)
    r, g, b = (_STOPS[i] + (_STOPS[i + 1] - _STOPS[i]) * (t - i)).round().astype(int)
    return f"rgb({r},{g},{b})"


def _shade(t: float) -> str:
    return _SHADES[round(min(max(float(t), 0.0), 1.0) * (len(_SHADES) - 1))]


def _cell(t: float, width: int, color: bool) -> Text:
    """One heatmap cell of ``width`` columns for a weight already normalised to 0..1."""
    if color:
        rgb = _rgb(t)
        return Text("█" * width, style=f"{rgb} on {rgb}")
    return Text(_shade(t) * width)


def _masked(width: int, color: bool) -> Text:
    return Text(MASKED.ljust(width), style="dim" if color else "")  # under its column's glyph, which is left


def _line(*parts: Text | str) -> Text:
    text = Text(no_wrap=True, overflow="crop", end="\n")
    for part in parts:
        text.append(part)
    return text


def _prose(*parts: Text | str) -> Text:
    """A line of words (a note, a key): wrapped at spaces on a narrow terminal, never cut mid-word."""
    text = _line(*parts)
    text.no_wrap, text.overflow = False, "fold"
    return text


def _fit(s: str, width: int) -> str:
    """Crop ``s`` to ``width`` cells, marking the cut with an ellipsis."""
    if cell_len(s) <= width:
        return s
    return set_cell_size(s, max(width - 1, 0)).rstrip() + "…"


def _vmax(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def _window_note(start: int, stop: int, offset: int, total: int) -> Text:
    """Which positions are shown, written as --range takes them (0-based, end excluded), and that the
    attention to the keys left out is not drawn: a learner read those rows as attending only nearby."""
    given = f"{total}" if offset == 0 else f"{offset}:{offset + total}"
    return _prose(f"showing positions {offset + start}:{offset + stop} of {given}, as many as fit this width; "
                  "attention to earlier keys is not drawn, so a row can add up to less than 1 "
                  "(--range A:B picks others)")


def _future_mask(n: int) -> np.ndarray:
    """True where the key comes after the query, i.e. the causal mask hides it."""
    return np.triu(np.ones((n, n), dtype=bool), k=1)


def _check(weights: np.ndarray, chars: str, ndim: int) -> np.ndarray:
    w = np.nan_to_num(np.asarray(weights, dtype=float))
    if w.ndim != ndim or w.shape[-1] != w.shape[-2] or w.shape[-1] != len(chars):
        raise ValueError(f"weights shape {w.shape} does not match {ndim}-d (..., T, T) with T == len(chars)")
    return w


def legend(vmax: float, *, color: bool = True, first_aside: bool = False) -> RenderableType:
    """The scale from 0 to ``vmax`` (the largest weight shown), the meaning of the masked glyph,
    and which way a heatmap reads."""
    ramp = Text()
    for t in np.linspace(0.0, 1.0, 8 if color else len(_SHADES)):
        ramp.append(_cell(float(t), 1, color))
    scale = "scaled to max shown" + (", first row aside" if first_aside else "")
    return Group(_prose("0 ", ramp, f" {vmax:.2f} ({scale})   ", _masked(1, color), " masked (future)"),
                 _prose("each row is one character looking back along the columns"))


def _scale(w: np.ndarray, mask: np.ndarray, first_sees_itself: bool) -> tuple[float, bool]:
    """The largest weight shown (``w``: (..., n, n)), and whether the first row was left out of it:
    the first character the model saw can attend only to itself, so its row is always 1, which
    would leave every weight under 1/8 blank in five shades."""
    aside = first_sees_itself and w.shape[-1] > 1
    rows = np.arange(w.shape[-1])[:, None] > 0 if aside else np.ones_like(mask)
    return _vmax(w[..., ~mask & rows]), aside


LRM = "\u200e"  # left-to-right mark


def _header_glyph(c: str) -> str:
    """Two cells: narrow glyphs padded, anything wider cropped to one cell. A right-to-left letter
    is followed by a left-to-right mark: a terminal that applies bidi would otherwise show a header
    of Arabic or Hebrew letters (separated only by spaces) reversed, each over another's column."""
    glyph = visible(c)
    glyph = set_cell_size(glyph, 2 - spacing_marks(glyph))
    return glyph + LRM if unicodedata.bidirectional(c) in ("R", "AL", "AN") else glyph


def spacing_marks(s: str) -> int:
    """Spacing combining marks in `s` (Devanagari's ि, ी, ा...): rich measures each as 0 cells where a
    terminal draws 1, so a cell count must add them (else a Hindi header drifts a column per sign)."""
    return sum(unicodedata.category(c) == "Mc" for c in s)


def head_view(
    weights: np.ndarray,
    chars: str,
    *,
    title: str = "",
    color: bool = True,
    max_width: int = 80,
    offset: int = 0,
    first_sees_itself: bool = False,
) -> RenderableType:
    """One head as a (query x key) heatmap, 2 columns per key, windowed to the last positions that
    fit. ``first_sees_itself``: ``chars[0]`` is the first character the model saw (see `_scale`)."""
    w = _check(weights, chars, 2)
    total = len(chars)
    digits = len(str(max(offset + total - 1, 0)))
    label_width = digits + 4  # "pos glyph " with a 2-cell glyph
    n = max(1, min(total, (max_width - label_width) // 2))
    start = total - n
    w, shown = w[start:, start:], chars[start:]
    mask = _future_mask(n)
    vmax, aside = _scale(w, mask, first_sees_itself and start == 0)
    lines: list[Text] = []
    if title:
        lines.append(_line(Text(_fit(title, max_width), style="bold" if color else "")))
    lines.append(_line(" " * label_width, *(_header_glyph(c) for c in shown)))
    for i in range(n):
        label = f"{offset + start + i:>{digits}} {_header_glyph(shown[i])} "
        cells = (_masked(2, color) if mask[i, j] else _cell(w[i, j] / vmax, 2, color) for j in range(n))
        lines.append(_line(label, *cells))
    if n < total:
        lines.append(_window_note(start, total, offset, total))
    lines.append(legend(vmax, color=color, first_aside=aside))
    return Group(*lines)


def _grid_layout(heads: int, label_width: int, total: int, max_width: int) -> tuple[int, int]:
    """How many panels per row (ideally one layer per row) and how many positions each shows."""
    def room(cols: int) -> int:
        return (max_width - _GAP * (cols - 1)) // cols

    cols = max(heads, 1)
    while cols > 1 and room(cols) < max(label_width, min(total, 8)):
        cols -= 1
    return cols, max(1, min(total, room(cols)))


def positions_shown(view: str, layer: int, heads: int, max_width: int) -> int | None:
    """How many positions the head or grid view draws of a long text at this width (None for the
    other views): a bare `inspect-attention` writes a text of that length, so all of it shows."""
    if view == "head":  # labels "pos glyph ": the positions' digits, a space, a 2-cell glyph, a space
        for digits in range(1, 12):
            n = max(1, (max_width - digits - 4) // 2)
            if len(str(n - 1)) <= digits:
                return n
    if view == "grid":
        return _grid_layout(heads, cell_len(f"L{layer} H{heads - 1}"), 10**9, max_width)[1]
    return None


def _mini_panel(w: np.ndarray, label: str, width: int, vmax: float, color: bool) -> list[Text]:
    """A small heatmap: 1 column per key, 1 row per query, padded to ``width``."""
    n = w.shape[0]
    mask = _future_mask(n)
    rows = [_line(set_cell_size(label, width))]
    for i in range(n):
        cells = (_masked(1, color) if mask[i, j] else _cell(w[i, j] / vmax, 1, color) for j in range(n))
        rows.append(_line(*cells, " " * (width - n)))
    return rows


def grid_view(
    weights: np.ndarray,
    chars: str,
    *,
    layer_labels: list[int] | None = None,
    color: bool = True,
    max_width: int = 80,
    offset: int = 0,
    first_sees_itself: bool = False,
) -> RenderableType:
    """Every layer x head as a small heatmap labelled ``L{l} H{h}``, one shared scale and legend
    (``first_sees_itself`` as in `head_view`)."""
    w = _check(weights, chars, 4)
    layers, heads, total = w.shape[0], w.shape[1], len(chars)
    labels = list(range(layers)) if layer_labels is None else list(layer_labels)
    if len(labels) != layers:
        raise ValueError(f"{len(labels)} layer labels for {layers} layers")
    names = [f"L{labels[li]} H{h}" for li in range(layers) for h in range(heads)]
    label_width = max(cell_len(s) for s in names)
    cols, n = _grid_layout(heads, label_width, total, max_width)
    start = total - n
    w = w[:, :, start:, start:].reshape(layers * heads, n, n)
    vmax, aside = _scale(w, _future_mask(n), first_sees_itself and start == 0)
    width = max(n, label_width)
    panels = [_mini_panel(w[k], names[k], width, vmax, color) for k in range(len(names))]
    lines: list[Text] = [_line(_fit("text: " + "".join(visible(c) for c in chars[start:]), max_width))]
    for first in range(0, len(panels), cols):
        row = panels[first:first + cols]
        for r in range(n + 1):
            parts: list[Text | str] = []
            for k, panel in enumerate(row):
                parts += ([" " * _GAP] if k else []) + [panel[r]]
            lines.append(_line(*parts))
    if n < total:
        lines.append(_window_note(start, total, offset, total))
    lines.append(legend(vmax, color=color, first_aside=aside))
    return Group(*lines)


def eighths_bar(p: float, width: int) -> str:
    """p in [0, 1] as up to `width` cells of █, to an eighth of a cell (unpadded)."""
    full, part = divmod(round(min(max(float(p), 0.0), 1.0) * width * 8), 8)
    return "█" * full + _EIGHTHS[part].strip()


def _bar(weight: float, color: bool, width: int = _BAR_WIDTH) -> Text:
    """A bar of ``width`` cells on the fixed 0..1 scale."""
    return Text(eighths_bar(weight, width).ljust(width), style=_rgb(weight) if color else "")


def _ranked(row: np.ndarray, at: int, top: int) -> list[int]:
    """Key positions up to ``at`` by descending weight; ties go to the more recent position."""
    candidates = np.arange(at + 1)[::-1]
    order = np.argsort(-row[candidates], kind="stable")
    return [int(p) for p in candidates[order][:top]]


def focus_view(
    weights: np.ndarray,
    chars: str,
    at: int,
    *,
    top: int = 5,
    color: bool = True,
    layer_labels: list[int] | None = None,
    offset: int = 0,
    max_width: int = 80,
) -> RenderableType:
    """For query index ``at``: each layer/head's top-``top`` attended keys as ranked bars.

    ``offset`` is the position of ``chars[0]`` in the prompt; labels show prompt positions.
    The bars shrink to fit ``max_width``: a narrow terminal cut the weight after them to "0".
    """
    w = _check(weights, chars, 4)
    total = len(chars)
    if not -total <= at < total:
        raise ValueError(f"position {at} out of range for {total} characters")
    at %= total
    labels = list(range(w.shape[0])) if layer_labels is None else list(layer_labels)
    digits = len(str(offset + total - 1))
    bar_width = max(1, min(_BAR_WIDTH, max_width - (digits + 6) - 5))  # label "  g 123 ", then " 0.42"
    bold = "bold" if color else ""
    lines = [_line(Text(f"attention from position {offset + at} {visible(chars[at])}", style=bold))]
    for li, layer in enumerate(labels):
        for h in range(w.shape[1]):
            row = w[li, h, at]
            lines.append(_line(Text(f"L{layer} H{h}", style=bold)))
            for pos in _ranked(row, at, max(top, 1)):
                glyph = _header_glyph(chars[pos])
                label = f"  {glyph} {offset + pos:>{digits}} "
                lines.append(_line(label, _bar(row[pos], color, bar_width), f" {row[pos]:.2f}"))
    return Group(*lines)
