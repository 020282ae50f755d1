"""The sampling engine: prefill once, then one cached decode step per character.

The KV cache is allocated once per call and used as a ring buffer, so generation
continues past the model's context at constant cost per character. Logit
filters apply in llama.cpp's order: repetition penalties, top-k, top-p, min-p,
then temperature (0 means greedy: the argmax, exactly).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import SampleConfig
from .corpus import Vocab


def filter_logits(logits: torch.Tensor, cfg: SampleConfig, history: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) after penalties and truncation; removed tokens get -inf. Temperature not applied."""
    logits = logits.float()  # every filter below is out of place: the caller's logits stay intact
    if history is not None and history.numel() and cfg.repeat_last_n != 0 and _has_penalties(cfg):
        logits = apply_penalties(logits, history if cfg.repeat_last_n < 0 else history[:, -cfg.repeat_last_n:], cfg)
    if cfg.top_k and cfg.top_k < logits.size(-1):  # (0, like None, is off)
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = _top_p(logits, cfg.top_p)
    if cfg.min_p is not None and cfg.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def penalty_window(cfg: SampleConfig, block_size: int) -> int:
    """How many recent characters the penalties look at: --repeat-last-n, where -1 is the model's
    whole context (llama.cpp's -1 is its context size)."""
    return block_size if cfg.repeat_last_n < 0 else cfg.repeat_last_n


def _has_penalties(cfg: SampleConfig) -> bool:
    return cfg.repeat_penalty != 1.0 or cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, recent: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
    """llama.cpp's penalties over the recent tokens: repeat divides positive logits (multiplies
    negative ones); presence subtracts a constant once; frequency subtracts per occurrence."""
    counts = torch.zeros_like(logits).scatter_add_(1, recent.long(), torch.ones_like(recent, dtype=logits.dtype))
    seen = counts > 0
    if cfg.repeat_penalty != 1.0:
        penalized = torch.where(logits > 0, logits / cfg.repeat_penalty, logits * cfg.repeat_penalty)
        logits = torch.where(seen, penalized, logits)
    return logits - counts * cfg.frequency_penalty - seen.float() * cfg.presence_penalty


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = (cum - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


GREEDY_BELOW = 1e-5  # temperatures under this are greedy: 0 exactly, and below float32's reach in the limit too


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The argmax at temperature 0; otherwise a draw from `tempered`, by racing exponential clocks:
    the first of independent Exp(rate p_i) clocks to ring is token i with probability p_i. Exact,
    and a third of `torch.multinomial`'s cost on one row (its per-call set-up dominates here)."""
    if is_greedy(temperature):
        return logits.argmax(-1)
    probs = tempered(logits, temperature)
    clocks = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-30)  # 0/0 would win argmax
    return (probs / clocks).argmax(-1)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The probabilities (B, V) that sampling at this (non-zero) temperature draws from."""
    return (logits / temperature).softmax(-1)  # above pick's greedy cut, |logits| / T stays finite


HALF_WEIGHTS_FROM = 8 << 20  # bytes of float32 weights; see decode_dtype


def decode_dtype(model, batch: int = 1, name: str = "auto") -> torch.dtype:
    """The weights' dtype for sampling `batch` sequences: half precision for CPU models whose
    float32 weights outgrow a last-level cache, and for batches where the CPU computes bfloat16.

    A one-character step reads every weight once, so a big model's step is bound by memory
    bandwidth: the 10.7M shape (43 MB of float32) decodes about 3x faster from half as many
    bytes here. float16 for one or two sequences (three more bits than bfloat16, in as many
    bytes: what a step of so few rows waits for), bfloat16 for batches where the CPU computes it
    natively (its dot-product instructions run 16 rows at twice float32's rate), float32 otherwise.
    Small models' batches are bfloat16 too where their whole step runs in C (`small_kernel`): 16
    rows of the 0.8M shape took 0.30 ms a step on AMX, 0.42 through AVX512_BF16, 0.49 in float32.
    """
    from .device import cpu_has_native_bf16

    if name != "auto":
        return getattr(torch, name)
    batch_bf16 = batch >= 3 and cpu_has_native_bf16()
    if not _big_cpu_model(model):
        return torch.bfloat16 if batch_bf16 and small_kernel(model, torch.bfloat16) else torch.float32
    if batch <= 2:
        return torch.float16
    return torch.bfloat16 if batch_bf16 else torch.float32


def _big_cpu_model(model) -> bool:
    """On a CPU, with float32 weights of HALF_WEIGHTS_FROM bytes or more."""
    big = sum(t.numel() for t in model.parameters()) * 4 >= HALF_WEIGHTS_FROM
    return big and model.head.weight.device.type == "cpu"


def new_cache(model, batch: int, cfg: SampleConfig):
    """The cache `cfg` samples with: weights in `decode_dtype`, and unless the step is compiled
    (`compiles`), laid out for fast few-row matmuls (`tfcli.model.packed`: tfcli's C kernels for
    float16 and float32 with AVX2 or AVX-512 and bfloat16 with AVX512_BF16, else oneDNN's layout
    for float32 and bfloat16) for CPU models of 8 MB and more, and for smaller ones where the
    whole step then runs in C (`small_kernel`). Keys and values are float16 when the weights are
    half too and the C kernel of `tfcli.decode_attention` will read them."""
    from .model import can_pack

    dtype = decode_dtype(model, batch, cfg.dtype)
    pack = not compiles(cfg, batch, model) and (_big_cpu_model(model) and can_pack(dtype) or small_kernel(model, dtype))
    half_kv = kernel_decodes(model.head.weight.device) and dtype in (torch.float16, torch.bfloat16)
    return model.new_cache(batch, dtype, pack, torch.float16 if half_kv else torch.float32)


def small_kernel(model, dtype: torch.dtype) -> bool:
    """Whether a small CPU model's weights are laid out for decode_matmul's C kernels: where the
    whole step then runs in C (`decode_matmul.Step`, which needs the attention kernel too). A
    step of the 0.8M shape took 0.09 ms that way against 0.35 in PyTorch's kernels, whose per-call
    cost is the whole of it; one C matmul at a time through ctypes was no faster than PyTorch's."""
    from . import decode_attention, decode_matmul

    device = model.head.weight.device
    return (device.type == "cpu" and not _big_cpu_model(model) and dtype in decode_matmul.dtypes()
            and decode_attention.kernel() is not None)


def compiles(cfg: SampleConfig, batch: int, model) -> bool:
    """Whether the decode step is compiled: with `--compile`, for one sample, where the C kernel of
    `tfcli.decode_attention` does not run. A compiled batch step was slower than the eager one at
    both sizes measured (16 samples of 500 characters: 2.1 vs 0.63 s at 0.8M parameters, 18 vs 1.5 s
    at 3.2M); and on a CPU the eager step through that kernel outran the compiled one (2,000
    characters of the 0.8M shape: 2,317 / 3,049 vs 1,172 / 2,379 chars/s; at context 128: 2,468 /
    2,960 vs 2,268 / 2,082)."""
    return cfg.compile and batch == 1 and not kernel_decodes(model.head.weight.device)


def kernel_decodes(device: torch.device) -> bool:
    """Whether decode steps on `device` go through the C kernel of `tfcli.decode_attention` (on a
    CPU, where it could be built); elsewhere they take PyTorch's path."""
    from .decode_attention import kernel
    return device.type == "cpu" and kernel() is not None


def matmul_dtypes(device: torch.device) -> list[str]:
    """Weight dtypes whose cached-step matmuls run in tfcli's C kernels on `device`
    (`tfcli.decode_matmul`: float16 and float32 with AVX2 or AVX-512, bfloat16 with AVX512_BF16,
    "bfloat16 on AMX" where AMX's tiles compute it), for bench's report."""
    from .decode_matmul import amx, dtypes
    names = [str(d).replace("torch.", "") for d in dtypes()] if device.type == "cpu" else []
    return [f"{n} on AMX" if n == "bfloat16" and amx() else n for n in names]


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string is never shown."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.buffer, self.done = stops, "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        if self.done:
            return ""
        self.buffer += text
        hits = [(i + len(s), i) for s in self.stops if (i := self.buffer.find(s)) >= 0]
        if hits:  # the stop completed first wins, as it would have one character at a time
            self.done = True
            out, self.buffer = self.buffer[:min(hits)[1]], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - keep]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.done else self.buffer), ""
        return out


def context_ids(vocab: Vocab, prompt: str, block_size: int, device) -> torch.Tensor:
    """The prompt's last block_size characters as ids (1, T); an empty prompt starts from a newline."""
    context = prompt or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    return torch.as_tensor(vocab.encode(context[-block_size:]).astype("int64"), device=device)[None]


@dataclass(frozen=True)
class Piece:
    """One step of generation, for every sample in the batch."""

    texts: list[str]  # text now safe to show ("" while held back for a possible stop string, or once stopped)
    chars: list[str]  # the character just sampled
    logprobs: list[float] | None  # its log-probability under the model, before penalties, filters and
    # temperature (None unless asked for: a step of a small model costs less than computing it)
    stopped: tuple[bool, ...] = ()  # whether each sample has met a stop string (and shows no more)


@torch.inference_mode()
def generate_pieces(model, vocab: Vocab, prompt: str, cfg: SampleConfig, logprobs: bool = True) -> Iterator[Piece]:
    """Prefill the prompt's last block_size characters, then one cached decode step per character.
    `logprobs=False` leaves Piece.logprobs None (it costs a few kernels per character)."""
    cfg.validate()  # (a notebook's settings: the CLI has checked its own)
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(cfg.seed if cfg.seed is not None else new_seed())
    B, T = cfg.num_samples, model.config.block_size
    ids = context_ids(vocab, prompt, T, device).repeat(B, 1)
    cache = new_cache(model, B, cfg)
    logits = model.prefill(ids, cache)
    pos, keep = ids.size(1), max(penalty_window(cfg, T), 1)
    history = ids[:, -keep:] if _has_penalties(cfg) else None
    matchers = [StopMatcher(cfg.stop) for _ in range(B)]
    decode = model.compiled_decoder(cache) if compiles(cfg, B, model) else model.decode
    for _ in range(cfg.max_new_tokens):
        nxt = pick(filter_logits(logits, cfg, history), cfg.temperature, gen)
        lps = logits.log_softmax(-1).gather(1, nxt[:, None])[:, 0].tolist() if logprobs else None
        if history is not None:
            history = torch.cat([history[:, 1 - keep:] if keep > 1 else history[:, :0], nxt[:, None]], dim=1)
        chars = [vocab.chars[i] for i in nxt.tolist()]
        yield Piece([m.feed(c) for m, c in zip(matchers, chars)], chars, lps, tuple(m.done for m in matchers))
        if all(m.done for m in matchers):
            return
        logits = decode(nxt, pos, cache)
        pos += 1
    tail = [m.flush() for m in matchers]
    if any(tail):
        yield Piece(tail, [""] * B, [0.0] * B if logprobs else None, tuple(m.done for m in matchers))


@torch.inference_mode()
def next_char_probs(model, vocab: Vocab, text: str, cfg: SampleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (V,) of the character after `text`: the model's own, and the ones sampling with
    `cfg` draws from (after penalties, filters and temperature; one-hot when greedy). The context is
    the one `generate_pieces` would start from, so the two agree on the first character."""
    model.eval()
    ids = context_ids(vocab, text, model.config.block_size, next(model.parameters()).device)
    logits = model.prefill(ids, new_cache(model, 1, cfg))
    filtered = filter_logits(logits, cfg, ids[:, -max(penalty_window(cfg, model.config.block_size), 1):])
    if is_greedy(cfg.temperature):
        sampled = torch.nn.functional.one_hot(filtered.argmax(-1), filtered.size(-1)).float()
    else:
        sampled = tempered(filtered, cfg.temperature)
    return logits.softmax(-1)[0], sampled[0]


def generate(model, vocab: Vocab, prompt: str, cfg: SampleConfig) -> Iterator[list[str]]:
    """Yields, per step, the new text of each sample ("" once a sample has hit a stop string).

    `cfg.seed` should be set (the caller chooses and reports a random one), so that the
    same seed and settings reproduce the same text.
    """
    for piece in generate_pieces(model, vocab, prompt, cfg, logprobs=False):
        yield piece.texts


class Aligned:
    """Pairs shown text with the log-probs of its characters (stop matching delays and drops text)."""

    def __init__(self, keep: bool = True):
        self.pending: list[float] = []
        self.parts: list[str] = []  # (joined when read: adding to one long string is quadratic)
        self.logprobs, self.stopped, self.keep = [], False, keep  # keep=False: only align, for a stream

    def tail(self, pieces: int) -> str:
        """The last pieces shown, read without changing anything (safe from a thread that draws)."""
        return "".join(self.parts[-pieces:])

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def add(self, shown: str, char: str, logprob: float) -> list[float]:
        if char:
            self.pending.append(logprob)
        lps, self.pending = self.pending[:len(shown)], self.pending[len(shown):]
        if shown and self.keep:
            self.parts.append(shown)
            self.logprobs += lps
        return lps


def collect(pieces, n: int, rows: list[Aligned] | None = None) -> tuple[list[Aligned], bool]:
    """Each sample's text, log-probs and whether a stop string ended it, and whether a Ctrl-C cut
    them short: then they are what was made until then, for the caller to show rather than lose.
    `rows` (n of them) lets a caller watch them fill."""
    rows = rows if rows is not None else [Aligned() for _ in range(n)]
    try:
        for piece in pieces:
            for row, shown, char, lp, stopped in zip(rows, piece.texts, piece.chars, piece.logprobs or [None] * n,
                                                     piece.stopped or [False] * n):
                row.add(shown, char, lp)
                row.stopped = stopped
    except KeyboardInterrupt:
        return rows, True
    return rows, False
