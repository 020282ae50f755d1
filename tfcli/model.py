"""A decoder-only transformer for characters, in plain PyTorch.

Pre-norm blocks (RMSNorm without gains) of causal multi-head self-attention and a
ReLU² MLP; rotary positions; QK-norm; no biases; output projections and the head
start at zero, so a new model predicts the uniform distribution exactly.

Rotary positions make attention depend only on the distance between characters,
which is what lets the KV cache be a ring buffer: generation runs past the
context with no recomputation and no seam. Attention runs fused
(`scaled_dot_product_attention`) on GPUs and in eager float32 without dropout; otherwise on
CPUs (bf16, dropout, compiled) whole sequences go through `causal_attention` (its backward is
2x faster there), and batched decoding through `attend`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import causal_attention, decode_attention, decode_matmul
from .config import ROPE_BASE, ModelConfig


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rope_angles(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim/2), computed in float64 so that far positions stay exact."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer, allocated once, written as a ring of block_size slots,
    plus the weights the cached steps compute with, in the cache's dtype. Activations are
    float32 whatever it is; keys and values are stored in `kv_dtype` (float16 halves the bytes
    a step streams, for the C kernel of `decode_attention`, which reads them in float32).

    Position p lives in slot p % block_size. Keys are stored already rotated, and rotary
    attention depends only on relative position, so the order of slots is irrelevant.
    Everything a decode step indexes (rotary tables, slot numbers, and the masks of the
    compiled step, which always reads the whole ring) is made here once, so the step itself
    allocates nothing but its activations. (Sampling on CPUs where tfcli's kernels run takes
    `tfcli.native_decoder` instead, whose step is one C call.)
    """

    def __init__(self, model: GPT, batch: int, dtype: torch.dtype, pack: bool = False,
                 kv_dtype: torch.dtype = torch.float32):
        cfg, device = model.config, model.head.weight.device
        T = cfg.block_size
        self.kv = torch.zeros((cfg.n_layer, 2, batch, cfg.n_head, T, cfg.head_dim), device=device, dtype=kv_dtype)
        self.masks = torch.ones(T, T, dtype=torch.bool, device=device).tril().view(T, 1, 1, 1, T)
        self.slots = torch.arange(T, device=device)
        self.head_dim, self.size = cfg.head_dim, T
        self.first, self.cos, self.sin = 0, *rotary_tables(4 * T, cfg.head_dim, device)
        self.weights = model.inference_weights(dtype, batch if pack else None)

    def angles(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows of positions [a, b), from tables that cover four contexts from
        `self.first` and move on when generation runs past them: tables that grew with the
        position took ~1 KB a character, 0.5 GB over a million of them."""
        if a < self.first or b > self.first + self.cos.size(0):
            self.first = a
            self.cos, self.sin = rotary_tables(max(4 * self.size, b - a), self.head_dim, self.kv.device, start=a)
        return self.cos[a - self.first:b - self.first], self.sin[a - self.first:b - self.first]

    def step(self, pos: int):
        """cos, sin and ring slot of position `pos`, and the part of the ring it attends to: until
        the ring is full, only the filled slots (the empty ones would be masked out, after
        costing as much to read as the rest)."""
        slot = pos % self.size
        kv = self.kv[..., :pos + 1, :] if pos < self.size else self.kv
        return *self.angles(pos, pos + 1), self.slots[slot:slot + 1], kv


def rotary_tables(n: int, head_dim: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width tables (n, head_dim) for `rotate`, of positions from `start`: cos|cos and -sin|sin."""
    cos, sin = rope_angles(torch.arange(start, start + n, device=device), head_dim)
    return torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in three kernels instead of nine: flipping the two halves of each head gives
    (x2, x1), which the -sin|sin table turns into the rotation's second term."""
    halves = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, halves, sin)


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x|: RMSNorm without its sqrt(d), which the cached steps fold into the next weights."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-30)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """Activations stay float32; only weights may be half (their bytes are what a step reads)."""
    if isinstance(w, decode_matmul.Packed):
        return w(x)
    if w.is_mkldnn:  # laid out by `packed`; oneDNN takes inputs of the weight's dtype
        return torch.ops.mkldnn._linear_pointwise(x.to(w.dtype).contiguous(), w, None, "none", [], "").float()
    return F.linear(x, w) if x.dtype == w.dtype else F.linear(x.to(w.dtype), w).float()


def unit_linear(x: torch.Tensor, w) -> torch.Tensor:
    """linear(unit(x), w); decode_matmul's kernels take the norm in the same call."""
    return w(x, unit=True) if isinstance(w, decode_matmul.Packed) else linear(unit(x), w)


def mlp_in(x: torch.Tensor, w) -> torch.Tensor:
    """relu(linear(unit(x), w))^2, the MLP's first half; in one call of decode_matmul's kernels."""
    if isinstance(w, decode_matmul.Packed):
        return w(x, unit=True, relu2=True)
    return torch.relu_(linear(unit(x), w)).square_()


def add_linear(x: torch.Tensor, y: torch.Tensor, w) -> torch.Tensor:
    """x + y @ w.T, in one kernel (addmm, or decode_matmul's) when nothing needs casting."""
    if isinstance(w, decode_matmul.Packed):
        return w(y, x)
    return torch.addmm(x, y, w.t()) if x.dtype == w.dtype and not w.is_mkldnn else x + linear(y, w)


def packed(weights: tuple, rows: int) -> tuple:
    """`inference_weights`' matrices laid out for steps of about `rows` rows: for the C kernels of
    `decode_matmul` where they take the dtype (float16 and float32, bfloat16 on CPUs with
    AVX512_BF16), else in oneDNN's blocked layout. On a Zen 4, a step's matmuls of the 3.2M shape took 0.09 ms
    (float16, one row) and 0.32-0.54 ms (bfloat16, 16 rows) in C against 0.32 ms through PyTorch's
    float16 kernel and 0.74-0.90 ms through oneDNN; 10.7M: 0.28 vs 0.88 and 1.24-1.52 vs 1.81-1.98.
    oneDNN's layout itself made 16-row bfloat16 matmuls of the 10.7M shape 1.5x faster than plain
    ones (2.0 vs 2.9 ms) and 2x in float32; below ~8 MB of weights its per-call cost outweighs it.
    float32 in C, against oneDNN's layout (Intel Xeon, whole decode steps of the 10.7M shape):
    1.3 vs 3.1 ms for one row, 6.2 vs 10.8 for 16."""
    wte, layers, head = weights

    def pack(w: torch.Tensor):
        if decode_matmul.takes(w):
            return decode_matmul.Packed(w)
        return torch.ops.mkldnn._reorder_linear_weight(w, rows)
    return wte, tuple(tuple(pack(w) for w in layer) for layer in layers), pack(head)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether `packed` weights of `dtype` work here: what `decode_matmul` takes, else float32, and
    bfloat16 where the CPU computes it natively (oneDNN lays float16 out only on CPUs with
    AVX512-FP16, which tfcli has not measured)."""
    if dtype in decode_matmul.dtypes():
        return True
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fused_kernel(slot, mask, kv: torch.Tensor):
    """The C kernel that does a decode step's attention (`tfcli.decode_attention`), where it runs:
    eager decode steps on CPUs (the compiled step passes a mask), when it could be built. Against
    PyTorch's path (500 characters, medians of 5 runs) it made 16 samples of the 10.7M model 1.6x
    faster (float16 keys and values: half the bytes) and one sample of the 0.8M model 1.7x (a
    dozen fewer kernel launches a layer)."""
    if slot is None or mask is not None or kv.device.type != "cpu":
        return None
    return decode_attention.kernel()


def attention(qkv: torch.Tensor, cos, sin, slot, mask, kv: torch.Tensor) -> torch.Tensor:
    """PyTorch's path for a layer's cached attention, from qkv (3, B, H, T, D): a prompt from
    position 0 (prefill, `slot` None), or one new position per sequence stored in ring slot `slot`
    and attending to `kv` (one layer's ring, (2, B, H, n, D)) but what `mask` hides."""
    q, k = rotate(unit(qkv[:2]), cos, sin)
    v = qkv[2]
    scale = q.size(-1) ** 0.5
    if slot is None:
        kv[:, :, :, :q.size(2)] = torch.stack((k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    kv.index_copy_(3, slot, torch.stack((k, v)).to(kv.dtype))  # (a float16 ring is the C kernel's, but
    keys, values = kv.to(q.dtype)                              # should it ever come here, it still works)
    return attend(q, keys, values, mask, scale)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """Attention of one new position per sequence over the ring. For batches on a CPU, two batched
    matmuls over the B*H heads ran 1.2-1.6x faster than scaled_dot_product_attention (whose
    kernel is built for many queries); a single sequence is faster through that kernel."""
    B, H, _, D = q.shape
    if B == 1 or mask is not None or q.device.type != "cpu":  # GPUs: not measured, left to the kernel
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    n = keys.size(2)  # reshapes below are views: batch and head strides of the ring merge
    scores = torch.bmm(q.reshape(B * H, 1, D) * scale, keys.reshape(B * H, n, D).transpose(1, 2))
    return torch.bmm(scores.softmax(-1), values.reshape(B * H, n, D)).view(B, H, 1, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def _qkv(self, x, cos, sin):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        # QK-norm keeps logits bounded, so lr can be high; q and k go through norm and rotation
        # together: half the kernel launches, which is what a one-character decode step is made of
        q, k = apply_rope(rms_norm(qkv[:2]), cos, sin)
        return q, k, qkv[2]  # (B, H, T, D) each

    def forward(self, x, cos, sin, need_weights: bool = False):
        q, k, v = self._qkv(x, cos, sin)
        p = self.dropout if self.training else 0.0
        cpu, T = x.device.type == "cpu", x.size(1)
        if need_weights:
            y, weights = self._explicit(q, k, v)
            return self._out(y), weights
        if cpu and T <= causal_attention.MAX_T and causal_attention.pays(q, p):
            return self._out(causal_attention.attend(q, k, v, self.scale, p)), None
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.scale)
        return self._out(y), None

    def _explicit(self, q, k, v):
        """Softmax attention spelled out, with its weights (fp32), for inspection."""
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        weights = scores.float().masked_fill(~causal, float("-inf")).softmax(-1)
        dropped = F.dropout(weights, self.dropout) if self.training and self.dropout else weights
        return dropped.to(v.dtype) @ v, weights

    def _out(self, y):
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(_ReluSquared.apply(self.fc(x)))


class _ReluSquared(torch.autograd.Function):
    """relu(x)², whose backward is one product with the saved relu(x): autograd's went through a
    square's and a relu's backward, three passes over the widest activation instead of two."""

    @staticmethod
    def forward(ctx, x):
        r = x.relu()
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad.mul(r).mul_(2)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, need_weights: bool = False):
        a, weights = self.attn(rms_norm(x), cos, sin, need_weights)
        p = self.dropout if self.training else 0.0
        x = x + causal_attention.dropout(a, p)
        return x + causal_attention.dropout(self.mlp(rms_norm(x)), p), weights


def weights_key(model: torch.nn.Module, tag) -> tuple | None:
    """What identifies the model's current weights, for caches of copies made from them (`tag`: what
    the copy is, e.g. its dtype): tensors count their in-place writes in `_version`, and a move to
    another device or a new `.data` changes where they live (.to() and .data= keep the version).
    None for weights made under inference_mode, which count no writes: those copies are remade."""
    params = list(model.parameters())
    if any(p.is_inference() for p in params):
        return None
    return tag, tuple((p._version, p.data_ptr()) for p in params)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_angles(torch.arange(cfg.block_size), cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.wte.weight, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.mlp.fc):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.proj.weight)
        nn.init.zeros_(self.head.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token at full context: 6N for the weights, 12 L d T for attention
        (PaLM's count, nanoGPT's MFU), whose share grows with the context."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, V); with targets, also the mean cross-entropy in nats (computed in fp32)."""
        T = idx.size(1)
        x = self.wte(idx)
        for block in self.blocks:
            x, _ = block(x, self.cos[:T], self.sin[:T])
        logits = self.head(rms_norm(x)).float()
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1).long())

    def generate(self, prompt: str = "", max_new_tokens: int = 200, *, unknown: str = "error", vocab=None,
                 **settings) -> str | list[str]:
        """The text that follows `prompt` (not repeated), for a notebook:
        `tfcli.load("runs/x").generate("ROMEO:", 300, temperature=0.7, seed=1)`.

        `settings` are SampleConfig's fields (temperature, top_k, top_p, min_p, the penalties, seed,
        stop, num_samples, ...); with num_samples > 1, a list of texts. Without a seed each call
        draws its own. `unknown` is sample's --unknown policy for prompt characters the model never
        saw. The vocabulary is the one `tfcli.load` attached, or `vocab` for a model built here.
        """
        from .config import SampleConfig
        from .corpus import Vocab
        from .errors import UsageError
        from .sampling import generate

        vocab = vocab if vocab is not None else getattr(self, "vocab", None)
        if vocab is None:
            raise UsageError("this model has no vocabulary: pass vocab=corpus.vocab, or get the model from tfcli.load")
        if not isinstance(vocab, Vocab):
            raise UsageError(f"vocab must be a Vocab (corpus.vocab, or Vocab.from_text), got {type(vocab).__name__}")
        fields = set(SampleConfig.__dataclass_fields__) - {"max_new_tokens"}
        if wrong := sorted(set(settings) - fields):
            raise UsageError(f"generate() has no setting {', '.join(wrong)}; it takes "
                             f"{', '.join(sorted({*fields, 'unknown', 'vocab'}))}")
        cfg = SampleConfig(max_new_tokens=max_new_tokens, **settings)
        steps = [list(step) for step in generate(self, vocab, vocab.fit(prompt, unknown)[0], cfg)]
        texts = ["".join(parts) for parts in zip(*steps)] if steps else [""] * cfg.num_samples  # (made after
        return texts if cfg.num_samples > 1 else texts[0]  # generate has checked that the batch fits)

    @torch.no_grad()
    def attention(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and attention weights (B, layer, head, query, key), by the explicit softmax path."""
        T = idx.size(1)
        x, maps = self.wte(idx), []
        for block in self.blocks:
            x, w = block(x, self.cos[:T], self.sin[:T], need_weights=True)
            maps.append(w)
        return self.head(rms_norm(x)).float(), torch.stack(maps, dim=1)

    def hidden_states(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after the embedding and after each block (for the logit lens)."""
        T = idx.size(1)
        x = self.wte(idx)
        states = [x]
        for block in self.blocks:
            x, _ = block(x, self.cos[:T], self.sin[:T])
            states.append(x)
        return states

    def logits_from_hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(rms_norm(x)).float()

    # -- KV-cached inference ------------------------------------------------------------
    # The cached steps are plain functions of tensors (no modules, no Python ints), in as few
    # kernels as the maths allows: a one-character step of a small model is made of per-kernel
    # overhead, and a large one's is made of reading its weights.

    def inference_weights(self, dtype: torch.dtype, packed_for: int | None = None) -> tuple:
        """(embedding, per-layer (qkv, proj, fc, out), head) in `dtype`, with the sqrt(d) of each
        RMSNorm folded into the weights that read its output (see `unit`). Made once per dtype
        and kept until a parameter changes (`weights_key`), so that generations reuse them and a
        compiled step stays valid. With `packed_for`, the same matrices laid out for oneDNN steps
        of that many rows (`packed`), kept alongside."""
        key = weights_key(self, dtype)
        if key is None or self.__dict__.get("_weights_key") != key:
            root_d = self.config.n_embd ** 0.5

            def w(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
                return (t.detach().float() * scale).to(dtype)
            layers = tuple((w(b.attn.qkv.weight, root_d), w(b.attn.proj.weight), w(b.mlp.fc.weight, root_d),
                            w(b.mlp.proj.weight)) for b in self.blocks)
            self._weights, self._weights_key = (w(self.wte.weight), layers, w(self.head.weight, root_d)), key
            self._packed = None
        if packed_for is None:
            return self._weights
        if key is None or self.__dict__.get("_packed") is None or self._packed[0] != packed_for:
            self._packed = packed_for, packed(self._weights, packed_for)
        return self._packed[1]

    def new_cache(self, batch: int, dtype: torch.dtype | None = None, pack: bool = False,
                  kv_dtype: torch.dtype = torch.float32) -> KVCache:
        """A cache for `batch` sequences, computing from weights in `dtype`, laid out for oneDNN
        with `pack` (see `packed`), keeping keys and values in `kv_dtype` (float16 only where
        `decode_attention.kernel()` reads it: PyTorch's own path stores float32)."""
        return KVCache(self, batch, dtype or self.head.weight.dtype, pack, kv_dtype)

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position of a prompt (at most block_size long), filling the cache."""
        T = idx.size(1)
        return cached_step(idx, *cache.angles(0, T), None, None, cache.kv, cache.weights, self.config.n_head)

    def decode(self, idx: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) for one new token per sequence at absolute position `pos`."""
        cos, sin, slot, kv = cache.step(pos)
        return cached_step(idx.view(-1, 1), cos, sin, slot, None, kv, cache.weights, self.config.n_head)

    def compiled_decoder(self, cache: KVCache):
        """`decode` for this cache's weights, compiled with a C++ wrapper and the weights as
        constants: a small model's step is mostly per-kernel overhead, which this removes, at
        3-10 s of compiling (once per process and weights)."""
        compiled = self.compiled_step(cache)

        def decode(idx: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
            cos, sin, slot, _ = cache.step(pos)
            mask = cache.masks[min(pos, cache.size - 1)]  # the whole ring, masked: one graph throughout
            return compiled(idx.view(-1, 1), cos, sin, slot, mask, cache.kv)
        return decode

    def compiled_step(self, cache: KVCache):
        """`cached_step` with this cache's weights as constants, compiled (a C++ wrapper on CPUs),
        taking (idx, cos, sin, slot, mask, kv); kept until the weights change."""
        weights, n_head = cache.weights, self.config.n_head
        if self.__dict__.get("_compiled_for") is not weights:
            def step(idx, cos, sin, slot, mask, kv):
                return cached_step(idx, cos, sin, slot, mask, kv, weights, n_head)
            options = {"cpp_wrapper": True} if cache.kv.device.type == "cpu" else {}
            if cache.kv.device.type == "cuda":  # float32 without TF32 is deliberate: the GPU's greedy
                warnings.filterwarnings(  # text is the CPU's; Inductor's advice to use it is noise
                    "ignore", message="TensorFloat32 tensor cores", category=UserWarning)
            self._compiled_step = torch.compile(step, dynamic=False, options=options)
            self._compiled_for = weights
        return self._compiled_step


def cached_step(idx, cos, sin, slot, mask, kv, weights, n_head: int) -> torch.Tensor:
    """Logits (B, V) after the last of `idx` (B, T). With `slot`, one new position per sequence
    whose key and value go to that ring slot (decode), attending to all of `kv` but what `mask`
    hides; without, a prompt from position 0 (prefill). Keys are cached unit-length, so
    attention scales by sqrt(head_dim) where RMSNorm'd keys would have divided by it."""
    wte, layers, head = weights
    x = F.embedding(idx, wte).float()
    B, T, C = x.shape
    D = C // n_head
    x = x.view(B * T, C)  # two dimensions: what addmm takes
    kernel = fused_kernel(slot, mask, kv)
    for (w_qkv, w_proj, w_fc, w_out), kv_i in zip(layers, kv):  # unbinding: one op, not one per index
        qkv = unit_linear(x, w_qkv)
        if kernel is not None:
            y = kernel(qkv, cos, sin, kv_i, slot, D ** 0.5)
        else:
            y = attention(qkv.view(B, T, 3, n_head, D).permute(2, 0, 3, 1, 4), cos, sin, slot, mask, kv_i)
            y = y.transpose(1, 2).reshape(B * T, C)
        x = add_linear(x, y, w_proj)
        x = add_linear(x, mlp_in(x, w_fc), w_out)
    return unit_linear(x.view(B, T, C)[:, -1], head)
