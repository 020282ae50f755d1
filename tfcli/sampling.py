"""The sampling engine: prefill once, then one cached decode step per character.

The KV cache is allocated once per call and used as a ring buffer, so generation
continues past the model's context at constant cost per character. Logit
filters apply in llama.cpp's order: repetition penalties, top-k, top-p, min-p,
then temperature (0 means greedy: the argmax, exactly).

A decoder hands each step's logits over as a numpy array: `native_decoder.Decoder` on CPUs
where tfcli's C kernels run (no torch imported, for a model loaded as `NativeModel`),
`TorchDecoder` elsewhere. Filters, penalties and the draw are numpy's, one implementation
whichever decoder computed the logits, with numpy's PCG64 generator: the same seed and
settings give the same text.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import native_decoder
from .config import SampleConfig, check_model
from .corpus import Vocab, show_char
from .errors import UsageError, at_command_line, setting, warn


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def filter_logits(logits: np.ndarray, cfg: SampleConfig, history: np.ndarray | None = None) -> np.ndarray:
    """Logits (B, V) after penalties and truncation; removed tokens get -inf. Temperature not applied."""
    logits = np.array(logits, dtype=np.float32)  # a copy: the caller's logits stay intact
    V = logits.shape[-1]
    if history is not None and history.size and cfg.repeat_last_n != 0 and _has_penalties(cfg):
        logits = apply_penalties(logits, history if cfg.repeat_last_n < 0 else history[:, -cfg.repeat_last_n:], cfg)
    if cfg.top_k and cfg.top_k < V:  # (0, like None, is off)
        logits[~_top_k_mask(logits, cfg.top_k)] = -np.inf
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = _top_p(logits, cfg.top_p)
    if cfg.min_p is not None and cfg.min_p > 0.0:
        probs = softmax(logits)
        logits[probs < np.float32(cfg.min_p) * probs.max(-1, keepdims=True)] = -np.inf
    return logits


def _top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """The k highest logits of each row, exactly k: ties at the k-th go to the lowest ids, as argmax
    breaks them, so that top-k 1 is greedy even where logits tie (an untrained model's all do)."""
    V = logits.shape[-1]
    kth = np.partition(logits, V - k, axis=-1)[:, V - k, None]
    above, tied = logits > kth, logits == kth
    room = k - above.sum(-1, keepdims=True)
    return above | (tied & (np.cumsum(tied, axis=-1) <= room))


def penalty_window(cfg: SampleConfig, block_size: int) -> int:
    """How many recent characters the penalties look at: --repeat-last-n, where -1 is the model's
    whole context (llama.cpp's -1 is its context size)."""
    return block_size if cfg.repeat_last_n < 0 else cfg.repeat_last_n


def _has_penalties(cfg: SampleConfig) -> bool:
    return cfg.repeat_penalty != 1.0 or cfg.presence_penalty != 0.0 or cfg.frequency_penalty != 0.0


def apply_penalties(logits: np.ndarray, recent: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    """llama.cpp's penalties over the recent tokens: repeat divides positive logits (multiplies
    negative ones); presence subtracts a constant once; frequency subtracts per occurrence."""
    recent = np.asarray(recent, dtype=np.int64)
    counts = np.stack([np.bincount(row, minlength=logits.shape[-1]) for row in recent]).astype(np.float32)
    seen = counts > 0
    if cfg.repeat_penalty != 1.0:
        rp = np.float32(cfg.repeat_penalty)
        logits = np.where(seen, np.where(logits > 0, logits / rp, logits * rp), logits)
    return (logits - counts * np.float32(cfg.frequency_penalty)
            - seen * np.float32(cfg.presence_penalty)).astype(np.float32)


def _top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    probs = softmax(np.take_along_axis(logits, order, -1))
    drop = (np.cumsum(probs, -1) - probs) >= p  # mass before this token already reaches p
    drop[:, 0] = False
    unsorted = np.empty_like(drop)
    np.put_along_axis(unsorted, order, drop, -1)
    return np.where(unsorted, np.float32(-np.inf), logits)


GREEDY_BELOW = 1e-5  # temperatures under this are greedy: 0 exactly, and below float32's reach in the limit too


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def new_rng(seed: int) -> np.random.Generator:
    """numpy's PCG64 from a 64-bit seed; a negative one (`check_seed` takes -2^63 and up, as
    PyTorch's generators do) as its two's complement, which PCG64 itself refuses."""
    return np.random.Generator(np.random.PCG64(seed % 2**64))


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """The argmax at temperature 0; otherwise a draw from `tempered`, by racing exponential clocks:
    the first of independent Exp(rate p_i) clocks to ring is token i with probability p_i. Exact,
    one vectorised draw for the whole batch."""
    if is_greedy(temperature):
        return logits.argmax(-1)
    probs = tempered(logits, temperature)
    clocks = np.maximum(rng.standard_exponential(probs.shape, dtype=np.float32), np.float32(1e-30))  # 0/0: no
    return (probs / clocks).argmax(-1)


def tempered(logits: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities (B, V) that sampling at this (non-zero) temperature draws from."""
    return softmax(logits / np.float32(temperature))  # above pick's greedy cut, |logits| / T stays finite


HALF_WEIGHTS_FROM = 8 << 20  # bytes of float32 weights; see decode_dtype


def decode_dtype(model, batch: int = 1, name: str = "auto") -> str:
    """The weights' dtype for sampling `batch` sequences: half precision for CPU models whose
    float32 weights outgrow a last-level cache, and for batches where the CPU computes bfloat16.

    A one-character step reads every weight once, so a big model's step is bound by memory
    bandwidth: the 10.7M shape (43 MB of float32) decodes about 3x faster from half as many
    bytes here. float16 for one or two sequences (three more bits than bfloat16, in as many
    bytes: what a step of so few rows waits for), bfloat16 for batches where the CPU computes it
    natively (its dot-product instructions run 16 rows at twice float32's rate), float32 otherwise.
    Small models' batches are bfloat16 too where tfcli's kernels decode them: 16 rows of the 0.8M
    shape took 0.30 ms a step on AMX, 0.42 through AVX512_BF16, 0.49 in float32.
    """
    from .native import cpu_has_native_bf16

    if name != "auto":
        return name
    batch_bf16 = batch >= 3 and cpu_has_native_bf16()
    if not _big_cpu_model(model):
        native = on_cpu(model) and native_decoder.runs("bfloat16", batch)
        return "bfloat16" if batch_bf16 and native else "float32"
    if batch <= 2:
        return "float16"
    return "bfloat16" if batch_bf16 else "float32"


def on_cpu(model) -> bool:
    return isinstance(model, native_decoder.NativeModel) or model.head.weight.device.type == "cpu"


def _big_cpu_model(model) -> bool:
    """On a CPU, with float32 weights of HALF_WEIGHTS_FROM bytes or more."""
    return on_cpu(model) and model.num_params() * 4 >= HALF_WEIGHTS_FROM


def new_decoder(model, batch: int, cfg: SampleConfig, decodes: bool = True):
    """`native_decoder.Decoder` where tfcli's kernels run this step (a CPU, the kernels built,
    the dtype theirs), else `TorchDecoder` (a `NativeModel` then becomes a PyTorch one).
    `decodes=False`: a prefill only, so no decode step is compiled or recorded."""
    if native_decodes(model, batch, cfg):
        return native_decoder.Decoder(native_weights(model, decode_dtype(model, batch, cfg.dtype)), batch)
    if isinstance(model, native_decoder.NativeModel):
        model = model.torch()
    return TorchDecoder(model, batch, cfg, decodes)


def native_weights(model, dtype: str) -> native_decoder.Weights:
    """The model's weights laid out for the native decoder, made once per dtype and kept until a
    parameter changes (`model.weights_key`)."""
    if isinstance(model, native_decoder.NativeModel):
        return model.weights(dtype)
    from .model import weights_key

    key = weights_key(model, dtype)
    kept = model.__dict__.get("_native_weights")
    if key is None or kept is None or kept[0] != key:
        state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        kept = key, native_decoder.Weights.from_state(state, model.config, dtype)
        model.__dict__["_native_weights"] = kept
    return kept[1]


class TorchDecoder:
    """PyTorch's cached steps (GPUs, CPUs without tfcli's kernels, --compile), handing numpy logits."""

    def __init__(self, model, batch: int, cfg: SampleConfig, decodes: bool = True):
        import torch

        self.torch, self.model, self.B = torch, model.eval(), batch
        self.device = next(model.parameters()).device
        with torch.inference_mode():
            self.cache = new_cache(model, batch, cfg)
            self.step = self._step(model, batch, cfg) if decodes else None

    def _step(self, model, batch: int, cfg: SampleConfig):
        """A replayed CUDA graph on a GPU (eager, the 10.7M shape's step ran at ~270 characters/s
        on an H200, ~1,300 replayed), of the compiled step with --compile (one sample, no C kernel)."""
        from . import cuda_graph

        compiled = compiles(cfg, batch, model)
        if cuda_graph.runs(self.device):
            try:
                return cuda_graph.decoder(model, self.cache, compiled)
            except RuntimeError:  # a step the GPU would not record (memory, an op it cannot capture):
                pass              # it still runs launched one kernel at a time
        return model.compiled_decoder(self.cache) if compiled else model.decode

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            idx = self.torch.as_tensor(ids, device=self.device)[None].repeat(self.B, 1)
            return self.model.prefill(idx, self.cache).float().cpu().numpy()

    def decode(self, ids: np.ndarray, pos: int) -> np.ndarray:
        with self.torch.inference_mode():
            idx = self.torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device)
            try:
                return self.step(idx, pos, self.cache).float().cpu().numpy()
            except Exception as e:  # noqa: BLE001 - only torch.compile's own failures are caught
                from .device import compile_failure
                if self.step == self.model.decode or compile_failure(e) is None:
                    raise
                self.step = self.model.decode  # (a compiler that is there but cannot build: as uncompiled)
                return self.step(idx, pos, self.cache).float().cpu().numpy()


def new_cache(model, batch: int, cfg: SampleConfig):
    """PyTorch's cache for `cfg`: weights in `decode_dtype`, and unless the step is compiled
    (`compiles`), laid out for oneDNN's few-row matmuls (`tfcli.model.packed`) for CPU models of
    8 MB and more. Keys and values are float16 when the weights are half too and the C kernel
    of `tfcli.decode_attention` will read them."""
    import torch

    from .model import can_pack

    dtype = getattr(torch, decode_dtype(model, batch, cfg.dtype))
    pack = not compiles(cfg, batch, model) and _big_cpu_model(model) and can_pack(dtype)
    half_kv = kernel_decodes(model.head.weight.device) and dtype in (torch.float16, torch.bfloat16)
    return model.new_cache(batch, dtype, pack, torch.float16 if half_kv else torch.float32)


def compiles(cfg: SampleConfig, batch: int, model) -> bool:
    """Whether the decode step is compiled: with `--compile`, for one sample, where the C kernel of
    `tfcli.decode_attention` does not run. A compiled batch step was slower than the eager one at
    both sizes measured (16 samples of 500 characters: 2.1 vs 0.63 s at 0.8M parameters, 18 vs 1.5 s
    at 3.2M); and on a CPU the eager step through that kernel outran the compiled one (2,000
    characters of the 0.8M shape: 2,317 / 3,049 vs 1,172 / 2,379 chars/s; at context 128: 2,468 /
    2,960 vs 2,268 / 2,082)."""
    device = model.head.weight.device
    if not (cfg.compile and batch == 1 and not kernel_decodes(device)):
        return False
    from .device import can_compile
    return device.type != "cpu" or can_compile()  # (a CPU compiles its kernels with a C++ compiler)


def kernel_decodes(device) -> bool:
    """Whether PyTorch's decode steps on `device` go through the C kernel of
    `tfcli.decode_attention` (on a CPU, where it could be built)."""
    from .decode_attention import kernel
    return str(device).startswith("cpu") and kernel() is not None


def native_decodes(model, batch: int, cfg: SampleConfig) -> bool:
    """Whether `new_decoder` takes the native decoder for this model, batch and settings."""
    return on_cpu(model) and native_decoder.runs(decode_dtype(model, batch, cfg.dtype), batch)


def matmul_dtypes(device) -> list[str]:
    """Weight dtypes whose cached-step matmuls run in tfcli's C kernels on `device`
    (`tfcli.decode_matmul`: float16 and float32 with AVX2 or AVX-512, bfloat16 with AVX512_BF16,
    "bfloat16 on AMX" where AMX's tiles compute it), for bench's report."""
    names = list(native_decoder.kinds()) if str(device).startswith("cpu") else []
    return [f"{n} on AMX" if n == "bfloat16" and native_decoder.amx() else n for n in names]


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


def context_ids(vocab: Vocab, prompt: str, block_size: int) -> np.ndarray:
    """The prompt's last block_size characters as ids (T,); an empty prompt starts from a newline."""
    context = prompt or ("\n" if "\n" in vocab.chars else vocab.chars[0])
    return vocab.encode(context[-block_size:]).astype(np.int64)


@dataclass(frozen=True)
class Piece:
    """One step of generation, for every sample in the batch."""

    texts: list[str]  # text now safe to show ("" while held back for a possible stop string, or once stopped)
    chars: list[str]  # the character just sampled
    logprobs: list[float] | None  # its log-probability under the model, before penalties, filters and
    # temperature (None unless asked for: a step of a small model costs less than computing it)
    stopped: tuple[bool, ...] = ()  # whether each sample has met a stop string (and shows no more)


PER_SAMPLE_OVERHEAD = 4096  # bytes of Python objects a sample keeps besides its cache (matchers, text, ...)


def batch_bytes(config, num_samples: int) -> int:
    """What a batch of samples holds at least: each one's keys and values for every layer and
    position (in float32 at most), its logits, and its Python objects."""
    per_sample = 4 * (2 * config.n_layer * config.block_size * config.n_embd + 4 * config.vocab_size)
    return num_samples * (per_sample + PER_SAMPLE_OVERHEAD)


def check_batch_fits(config, num_samples: int) -> None:
    """Refuse a batch larger than this machine's memory, before any of it is made (10^8 samples
    grew to gigabytes with nothing said, until the kernel killed the process)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # (not POSIX: no figure to compare with)
        return
    need = batch_bytes(config, num_samples)
    if need > memory:
        most = max(1, num_samples * memory // need)
        raise UsageError(f"{setting('num_samples')} {num_samples:,} needs about {need / 2**30:,.1f} GiB for its "
                         f"caches; this machine has {memory / 2**30:,.1f} GiB (at most about {most:,} samples)")


def generate_pieces(model, vocab: Vocab, prompt: str, cfg: SampleConfig, logprobs: bool = True) -> Iterator[Piece]:
    """Prefill the prompt's last block_size characters, then one cached decode step per character.
    `logprobs=False` leaves Piece.logprobs None (a small model's step costs less than computing it)."""
    check_model(model, "generate")
    if not isinstance(cfg, SampleConfig) or not isinstance(vocab, Vocab):
        raise UsageError(f"generate takes a model, its Vocab, the prompt and a SampleConfig, got a "
                         f"{type(vocab).__name__} and a {type(cfg).__name__}")
    cfg.validate()  # (a notebook's settings: the CLI has checked its own)
    check_batch_fits(model.config, cfg.num_samples)
    rng = new_rng(cfg.seed if cfg.seed is not None else new_seed())
    B, T = cfg.num_samples, model.config.block_size
    ids = context_ids(vocab, prompt, T)
    decoder = new_decoder(model, B, cfg)
    logits = decoder.prefill(ids)
    pos, keep, rows = len(ids), max(penalty_window(cfg, T), 1), np.arange(B)
    history = np.repeat(ids[None, -keep:], B, axis=0) if _has_penalties(cfg) else None
    stops = tuple(vocab.spelt_as_known(s) for s in cfg.stop)  # (spelt as the prompt is: \r\n as \n, NFC or NFD)
    for stop in stops if not at_command_line() else ():  # (the CLI warns in its own words, with a typing hint)
        if missing := vocab.unknown(stop):  # (a notebook's was accepted, and silently never matched)
            warn(f"stop={stop!r} can never match: the model's vocabulary has no "
                 f"{' '.join(show_char(c) for c in missing)}")
    matchers = [StopMatcher(stops) for _ in range(B)]
    for _ in range(cfg.max_new_tokens):
        nxt = pick(filter_logits(logits, cfg, history), cfg.temperature, rng)
        lps = log_softmax(logits)[rows, nxt].tolist() if logprobs else None
        if history is not None:
            history = np.concatenate([history[:, 1 - keep:] if keep > 1 else history[:, :0], nxt[:, None]], axis=1)
        chars = [vocab.chars[i] for i in nxt.tolist()]
        yield Piece([m.feed(c) for m, c in zip(matchers, chars)], chars, lps, tuple(m.done for m in matchers))
        if all(m.done for m in matchers):
            return
        logits = decoder.decode(nxt, pos)
        pos += 1
    tail = [m.flush() for m in matchers]
    if any(tail):
        yield Piece(tail, [""] * B, [0.0] * B if logprobs else None, tuple(m.done for m in matchers))


def next_char_probs(model, vocab: Vocab, text: str, cfg: SampleConfig) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (V,) of the character after `text`: the model's own, and the ones sampling with
    `cfg` draws from (after penalties, filters and temperature; one-hot when greedy). The context is
    the one `generate_pieces` would start from, so the two agree on the first character."""
    ids = context_ids(vocab, text, model.config.block_size)
    logits = new_decoder(model, 1, cfg, decodes=False).prefill(ids)
    filtered = filter_logits(logits, cfg, ids[None, -max(penalty_window(cfg, model.config.block_size), 1):])
    if is_greedy(cfg.temperature):
        sampled = np.eye(filtered.shape[-1], dtype=np.float32)[filtered.argmax(-1)]
    else:
        sampled = tempered(filtered, cfg.temperature)
    return softmax(logits)[0], sampled[0]


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
