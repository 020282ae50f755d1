"""What a person watches: training progress, heatmaps, sampled text. Imports rich, never torch."""


def plural(n: int, word: str) -> str:
    """'1 step', '2 steps': counts read as English."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"
