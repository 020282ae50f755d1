"""Attention extraction and analysis: numbers, not pictures.

Weights come from the model's explicit-softmax path, which tests hold equal to the
attention used in training and sampling: `tfcli.model.GPT`'s, or for a model read without
PyTorch (`native_decoder.NativeModel`, what the CLI loads) the same path in numpy. A prompt longer than the context is
cut to its last `block_size` characters, as the model would see it when sampling.

Head patterns are scored like TransformerLens' head detector: a pattern names, for each
query, the keys it would attend to; a head's score is its mean attention share on those
keys, over the queries where the pattern is defined (query 0, which can only attend to
itself, is never counted). Scores describe where attention goes, not what the head does.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from .config import check_model
from .errors import UsageError, setting
from .native_decoder import NativeModel

GENERATE_TEMPERATURE = 0.8  # what the model writes for itself to be looked at: sample's default
# Specific patterns first: a head matching one of them is labelled by it even if the
# broad "local" pattern (which contains previous and current) scores higher.
SPECIFIC = ("previous", "current", "first", "duplicate", "induction")
PATTERNS = (*SPECIFIC, "local")
LOCAL_WINDOW = 4  # keys q-3..q
THRESHOLD = 0.4
DIFFUSE_ENTROPY = 0.8  # mean normalised entropy at which a head counts as spread over everything


@dataclass(frozen=True)
class Attention:
    text: str  # the characters the model saw (query = key axis)
    weights: np.ndarray  # (layer, head, query, key), rows sum to 1 over the causal past
    offset: int  # position of text[0] in the full prompt
    logits: np.ndarray  # (query, vocab): the model's next-character logits at each position


def forward(model, ids: np.ndarray, states: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Logits (T, V), attention weights (layer, head, T, T) and, with `states` (or for a
    `NativeModel`, where they come free), the residual stream after the embedding and each block,
    as numpy arrays, for a `GPT` or a `NativeModel`."""
    if isinstance(model, NativeModel):
        return model.forward(ids)
    import torch

    with torch.no_grad():
        idx = torch.as_tensor(np.asarray(ids, dtype=np.int64), device=next(model.parameters()).device)[None]
        logits, weights = model.attention(idx)
        stream = [x[0].float().cpu().numpy() for x in model.hidden_states(idx)] if states else []
    return logits[0].float().cpu().numpy(), weights[0].float().cpu().numpy(), stream


def logits_from_hidden(model, x: np.ndarray) -> np.ndarray:
    if isinstance(model, NativeModel):
        return model.logits_from_hidden(x)
    import torch

    with torch.no_grad():
        x = torch.as_tensor(x, device=next(model.parameters()).device)
        return model.logits_from_hidden(x).float().cpu().numpy()


def _check_text(model, text: str, caller: str, empty: str = "") -> None:
    check_model(model, caller)
    if not isinstance(text, str):
        raise UsageError(f"{caller} takes the text itself (a str), got {type(text).__name__}")
    if getattr(model, "vocab", None) is None:
        raise UsageError("this model has no vocabulary: get it from tfcli.load, or set model.vocab = corpus.vocab")
    if not text:
        raise UsageError(f"the prompt is empty: {empty or caller + ' needs at least one character'}")


def _ids(model, text: str) -> np.ndarray:
    return model.vocab.encode(text).astype(np.int64)


def attention(model, text: str, unknown: str = "error") -> Attention:
    """Attention weights of every head for `text` (its last block_size characters), spelt as the
    model's vocabulary spells it, as `generate` takes a prompt (line ends, Unicode forms: a \r\n
    that generate took was refused here); `unknown`: error, skip or replace for characters the
    model never saw. `Attention.text` is what was read."""
    _check_text(model, text, "attention")
    text = model.vocab.fit(text, unknown)[0]
    if not text:
        raise UsageError("nothing is left of the text once its unknown characters are dropped")
    offset = max(0, len(text) - model.config.block_size)
    seen = text[offset:]
    logits, weights, _ = forward(model, _ids(model, seen))
    return Attention(seen, weights, offset, logits)


# -- head patterns ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadPattern:
    layer: int
    head: int
    scores: dict[str, float]  # pattern -> mean attention share on its targets (nan: never defined)
    entropy: float  # mean row entropy / log(keys available): 0 = one key, 1 = uniform
    label: str  # a pattern name, "diffuse", "mixed", or "too short" (one character: nothing to choose from)


def pattern_targets(ids: np.ndarray) -> dict[str, np.ndarray]:
    """For each pattern, a (query, key) boolean array of the keys it attends to."""
    ids = np.asarray(ids)
    T = len(ids)
    q, k = np.indices((T, T))
    past = k < q
    same = ids[:, None] == ids[None, :]
    after_same = np.zeros((T, T), dtype=bool)  # key k follows an earlier copy of the query's char
    after_same[:, 1:] = same[:, :-1]
    targets = {
        "previous": k == q - 1,
        "current": k == q,
        "first": k == 0,
        "duplicate": past & same,
        "induction": past & after_same,
        "local": (k <= q) & (k > q - LOCAL_WINDOW),
    }
    targets = {name: t & (q > 0) for name, t in targets.items()}  # query 0 has no choice
    return targets


def _entropy(w: np.ndarray, first: int = 0) -> float:
    """Mean normalised entropy of rows max(first, 1).. of a (T, T) causal attention matrix."""
    T, first = w.shape[-1], max(first, 1)
    if T <= first:
        return float("nan")
    p = np.clip(w[first:], 1e-12, 1.0)
    h = -(w[first:] * np.log(p)).sum(-1)
    return float(np.mean(h / np.log(np.arange(first + 1, T + 1))))


def _label(scores: dict[str, float], entropy: float, threshold: float) -> str:
    """The rule the summary prints, applied to the figures as it prints them (two decimals): an
    entropy of 0.797, shown 0.80, was labelled local beside "diffuse if entropy ≥ 0.80"."""
    if not np.isfinite(entropy) and not any(np.isfinite(s) for s in scores.values()):
        return "too short"  # one position: it attends to itself, and no pattern is defined
    specific = {n: s for n, s in scores.items() if n in SPECIFIC and np.isfinite(s)}
    best = max(specific, key=lambda n: specific[n], default=None)  # ties: earlier in SPECIFIC wins
    if best is not None and round(specific[best], 2) >= threshold:  # (the highest as measured, not as rounded)
        return best
    if round(entropy, 2) >= DIFFUSE_ENTROPY:
        return "diffuse"
    if round(scores.get("local", 0.0), 2) >= threshold:
        return "local"
    return "mixed"


def score_heads(weights: np.ndarray, ids: np.ndarray, threshold: float = THRESHOLD,
                layers: list[int] | None = None, first_query: int = 0) -> list[HeadPattern]:
    """Score every head of `weights` (layer, head, query, key) against each pattern for token `ids`,
    over the queries from `first_query` on. Rows are whole: a query's keys start at position 0
    whichever queries are scored, so its shares still sum to 1 and "first" is position 0."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] != len(ids):
        raise ValueError(f"weights shape {w.shape} does not match (L, H, T, T) with T == {len(ids)}")
    labels = list(range(w.shape[0])) if layers is None else list(layers)
    targets = pattern_targets(ids)
    scored = np.arange(len(ids)) >= first_query
    out = []
    for li, layer in enumerate(labels):
        for h in range(w.shape[1]):
            scores = {}
            for name, t in targets.items():
                rows = t.any(-1) & scored
                scores[name] = float((w[li, h] * t).sum(-1)[rows].mean()) if rows.any() else float("nan")
            entropy = _entropy(w[li, h], first_query)
            out.append(HeadPattern(layer, h, scores, entropy, _label(scores, entropy, threshold)))
    return out


def probe_ids(vocab_size: int, block_size: int, seed: int = 0) -> np.ndarray:
    """A random string of ~block_size/2 - 1 ids, repeated twice: the second copy rewards induction."""
    n = max(1, block_size // 2 - 1)
    rng = np.random.default_rng(seed)
    half = rng.choice(vocab_size, size=n, replace=n > vocab_size)
    return np.concatenate([half, half])


def probe_attention(model, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the probe and the model's attention on it, (layer, head, T, T)."""
    ids = probe_ids(model.config.vocab_size, model.config.block_size, seed)
    return ids, forward(model, ids)[1]


# -- logit lens ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lens:
    at: int  # query index into the text the model saw
    stages: list[str]  # "embed", then "L0".. : the residual stream after each block
    top: list[list[tuple[str, float]]]  # per stage, the k likeliest next characters and their probabilities
    actual: str | None  # the character that follows `at` in the prompt, if any
    actual_p: list[float]  # per stage, the probability given to `actual` (empty if none)


def _position(at) -> int | None:
    """`at` as an index (a numpy integer is one too), or None where it is no integer (a bool is not)."""
    if isinstance(at, bool):
        return None
    try:
        return operator.index(at)
    except TypeError:
        return None


def logit_lens(model, text: str, at: int, k: int = 5) -> Lens:
    """Next-character guesses at query `at` (0 to len(text) - 1) read off the residual stream after
    each block; the query sees the block_size characters up to it, as when sampling. The text is
    read as `attention` reads it (its positions are those of `Attention.text`)."""
    _check_text(model, text, "logit_lens")
    text = model.vocab.fit(text)[0]
    ids = _ids(model, text)
    given, at = at, _position(at)
    if at is None or not 0 <= at < len(text):
        raise UsageError(f"at={given!r} is not a position in the text (0 to {len(text) - 1})")
    start = max(0, at + 1 - model.config.block_size)  # (a longer text failed inside the model)
    states = forward(model, ids[start:at + 1], states=True)[2]
    vocab = model.vocab.chars
    stages = ["embed", *(f"L{i}" for i in range(len(states) - 1))]
    actual = text[at + 1] if at + 1 < len(text) else None
    top, actual_p = [], []
    for x in states:
        probs = _softmax(logits_from_hidden(model, x[at - start]).astype(np.float64))
        order = np.argsort(-probs, kind="stable")[:k]
        top.append([(vocab[i], float(probs[i])) for i in order])
        if actual is not None:
            actual_p.append(float(probs[vocab.index(actual)]))
    return Lens(at, stages, top, actual, actual_p)


# -- attention behind generated text ---------------------------------------------------------

@dataclass(frozen=True)
class GeneratedStep:
    index: int  # position of the generated character in `Generation.text`
    char: str
    p: float  # the model's probability for it (before temperature)
    keys_from: int  # position of the first key the query could see (the context is a window)
    weights: np.ndarray  # (layer, head, keys): attention of the query that predicted `char`


@dataclass(frozen=True)
class Generation:
    text: str  # prompt + generated characters
    start: int  # position of the first generated character
    steps: list[GeneratedStep]


def generation_attention(model, prompt: str, n: int, seed: int) -> Generation:
    """Sample `n` characters after `prompt`; for each, the attention of the query that produced it.

    The character at position j was sampled from the logits of query j-1, which saw the
    last block_size characters before j; those windows are re-run with the explicit-softmax path.
    Every window that starts at position 0 is a prefix of the longest one, and attention is
    causal, so one forward over that one answers them all (200 characters took 5.6 s one window
    at a time).
    """
    from .config import SampleConfig
    from .sampling import generate

    _check_text(model, prompt, "generation_attention", "generating continues a prompt of at least one character")
    prompt = model.vocab.fit(prompt)[0]  # (as generate will spell it: the text is read back through it)
    cfg = SampleConfig(max_new_tokens=n, seed=seed, temperature=GENERATE_TEMPERATURE).validate()
    text = prompt + "".join(parts[0] for parts in generate(model, model.vocab, prompt, cfg))
    T = model.config.block_size
    prefix = min(len(text) - 1, T)  # the windows [0, j) for j up to here
    if len(prompt) <= prefix:
        logits, weights, _ = forward(model, _ids(model, text[:prefix]))
    steps = []
    for j in range(len(prompt), len(text)):
        s = max(0, j - T)
        if s == 0:  # a row of the one forward: query j-1 over keys [0, j)
            row_logits, row_weights = logits[j - 1], weights[:, :, j - 1, :j]
        else:
            window_logits, window_weights, _ = forward(model, _ids(model, text[s:j]))
            row_logits, row_weights = window_logits[-1], window_weights[:, :, -1]
        p = float(_softmax(row_logits.astype(np.float64))[model.vocab.chars.index(text[j])])
        steps.append(GeneratedStep(j, text[j], p, s, row_weights))
    return Generation(text, len(prompt), steps)


OWN_TEXT = 48  # characters a bare `inspect-attention` looks at: a heatmap that fits a terminal


def opening(vocab) -> str:
    """Where the model starts writing its own text: a line break, else a space, else any character."""
    return next((c for c in "\n " if c in vocab.chars), vocab.chars[0])


def own_text(model, seed: int, n: int = OWN_TEXT) -> str:
    """Text the model writes from `opening`, to look at when no prompt is given: the heads at work
    on text like their corpus, whatever that was (no prompt suits every model)."""
    from .config import SampleConfig
    from .sampling import generate

    start = opening(model.vocab)
    cfg = SampleConfig(max_new_tokens=max(1, min(n, model.config.block_size) - 1), seed=seed,
                       temperature=GENERATE_TEMPERATURE).validate()
    return start + "".join(parts[0] for parts in generate(model, model.vocab, start, cfg))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def aggregate(weights: np.ndarray, how: str, axis: int | tuple[int, ...]) -> np.ndarray:
    """Mean or max of attention weights over heads (and layers); max rows no longer sum to 1."""
    if how == "mean":
        return np.asarray(weights).mean(axis=axis)
    if how == "max":
        return np.asarray(weights).max(axis=axis)
    raise UsageError(f"{setting('how', flag='--aggregate')} must be mean or max, got {how!r}")
