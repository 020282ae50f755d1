"""Generated text coloured by the probability the model gave each character."""

from __future__ import annotations

import math

from rich.text import Text

PROB_STYLES = ((0.1, "red"), (0.3, "dark_orange"), (0.6, "yellow"), (0.9, "green"), (1.01, "bright_green"))


def prob_style(logprob: float) -> str:
    p = math.exp(logprob)
    return next(style for bound, style in PROB_STYLES if p < bound)


def prob_legend() -> Text:
    legend = Text("probability: ")
    for (lo, _), (hi, style) in zip(((0.0, ""), *PROB_STYLES[:-1]), PROB_STYLES):
        legend.append(f"{lo:.1f}–{min(hi, 1.0):.1f} ", style=style)
    return legend


def styled(text: str, logprobs: list[float]) -> Text:
    out = Text()
    for ch, lp in zip(text, logprobs):
        out.append(ch, style=prob_style(lp))
    return out
