"""Generated text coloured by the probability the model gave each character."""

from __future__ import annotations

import math

from rich.text import Text

PROB_STYLES = ((0.1, "red"), (0.3, "dark_orange"), (0.6, "yellow"), (0.9, "green"), (1.01, "bright_green"))
# Bidirectional embeddings, overrides and isolates: a terminal that lays out bidi text would reorder
# what follows one to the end of the line ("Trojan Source"). The marks (LRM, RLM, ALM) reorder
# nothing past their neighbours and belong to Arabic and Hebrew text: they stay.
BIDI_CONTROLS = (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
# C0 controls but line break and tab as Unicode's control pictures, DEL as ␡, C1 and bidi controls as ◌
_SAFE = {c: 0x2400 + c for c in range(0x20) if c not in (0x0A, 0x09)} | {0x7F: 0x2421} | {
    c: 0x25CC for c in (*range(0x80, 0xA0), *BIDI_CONTROLS)}


_CARETS = {c: "^" + chr(c + 64) for c in range(0x20) if c not in (0x0A, 0x09)} | {0x7F: "^?"} | {
    c: "?" for c in (*range(0x80, 0xA0), *BIDI_CONTROLS)}


def for_terminal(text: str, unicode: bool = True) -> str:
    """Text as a terminal should get it: control characters as symbols, one for each (or, for a
    terminal that cannot encode them, in caret notation: ^[ for ESC). A model trained on logs or
    captured terminal output writes escape sequences, which a terminal would obey (colours, a
    moved cursor, a changed title), and bidi controls (BIDI_CONTROLS); a pipe or a file gets the bytes."""
    return text.translate(_SAFE if unicode else _CARETS)


def prob_style(logprob: float) -> str:
    p = math.exp(logprob)
    return next(style for bound, style in PROB_STYLES if p < bound)


def prob_legend() -> Text:
    legend = Text("probability: ")
    for (lo, _), (hi, style) in zip(((0.0, ""), *PROB_STYLES[:-1]), PROB_STYLES):
        legend.append(f"{lo:.1f}–{min(hi, 1.0):.1f} ", style=style)
    return legend


def styled(text: str, logprobs: list[float], unicode: bool = True) -> Text:
    """For a colour terminal: each character in its probability's colour (`for_terminal`'s symbols)."""
    out = Text()
    for ch, lp in zip(text, logprobs):
        out.append(for_terminal(ch, unicode), style=prob_style(lp))
    return out


def tail_cells(text: str, cells: int) -> str:
    """The end of `text` that fits in `cells` terminal columns, line breaks shown as ⏎ and tabs as ⇥."""
    from rich.cells import cell_len

    out, used = [], 0
    for ch in reversed(for_terminal(text).replace("\n", "⏎").replace("\t", "⇥")):  # (a tab has no width of its own)
        used += cell_len(ch)
        if used > cells:
            break
        out.append(ch)
    return "".join(reversed(out))


def batch_progress(prompt: str, tails: list[str], width: int, height: int = 1000) -> Text:
    """One line per sample while a batch generates: where each has got to (its last characters),
    so a batch shows it is alive before the samples print whole at the end. At most `height - 1`
    lines: a view taller than the screen cannot be erased, and the rest are counted instead."""
    lines = Text()
    label = len(str(len(tails)))
    shown = tails if len(tails) < height else tails[:max(height - 2, 0)]
    for i, tail in enumerate(shown):
        head = f"{i + 1:>{label}} │ "
        lines.append(head, style="dim")
        lines.append(tail_cells(prompt + tail, max(width - len(head) - 1, 1)))
        lines.append("\n" if i + 1 < len(tails) else "")
    if len(shown) < len(tails):
        lines.append(f"… and {len(tails) - len(shown)} more", style="dim")
    return lines
