"""A decoder-only transformer for characters, in plain PyTorch.

Pre-norm blocks (RMSNorm without gains) of causal multi-head self-attention and a
ReLU² MLP; rotary positions; QK-norm; no biases; output projections and the head
start at zero, so a new model predicts the uniform distribution exactly.

Rotary positions make attention depend only on the distance between characters,
which is what lets the KV cache be a ring buffer: generation runs past the
context with no recomputation and no seam. Attention runs fused
(`scaled_dot_product_attention`) except when its weights are asked for.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

ROPE_BASE = 10_000.0
EXPLICIT_MAX_T = 128  # CPU training: spelled-out attention up to this context, fused beyond


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
    """Keys and values of every layer, allocated once, written as a ring of block_size slots.

    Position p lives in slot p % block_size. Keys are stored already rotated, and rotary
    attention depends only on relative position, so the order of slots is irrelevant.
    Everything a decode step indexes (rotary angles, masks, slot numbers) is made here
    once, so the step itself allocates nothing but its activations.
    """

    def __init__(self, cfg: ModelConfig, batch: int, device, dtype):
        T = cfg.block_size
        shape = (cfg.n_layer, batch, cfg.n_head, T, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.masks = torch.ones(T, T, dtype=torch.bool, device=device).tril().view(T, 1, 1, 1, T)
        self.slots = torch.arange(T, device=device)
        self.head_dim, self.size = cfg.head_dim, T
        self.cos, self.sin = rope_angles(torch.arange(4 * T, device=device), cfg.head_dim)

    def step(self, pos: int):
        """cos, sin, slot and attention mask (None once the ring is full) for position `pos`."""
        if pos >= self.cos.size(0):  # generation ran long: extend the angle table, doubling
            self.cos, self.sin = rope_angles(torch.arange(2 * pos, device=self.k.device), self.head_dim)
        slot = pos % self.size
        mask = self.masks[pos] if pos < self.size else None
        return self.cos[pos:pos + 1], self.sin[pos:pos + 1], self.slots[slot:slot + 1], mask


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
        if need_weights or (x.device.type == "cpu" and x.size(1) <= EXPLICIT_MAX_T):
            y, weights = self._explicit(q, k, v)
            return self._out(y), weights if need_weights else None
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.scale)
        return self._out(y), None

    def _explicit(self, q, k, v):
        """Softmax attention spelled out, with its weights (fp32).

        Also the CPU training path for short contexts: PyTorch's fused CPU attention has a
        slow backward, and at T <= 128 these small matmuls plus one fused softmax train a
        step 1.3x faster (0.8M and 4.8M shapes, bf16, compiled; `tfcli bench`). At 256 the
        two tie, and beyond it the fused kernel saves the (T, T) scores' memory.
        """
        T = q.size(-2)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        weights = scores.float().masked_fill(~causal, float("-inf")).softmax(-1)
        dropped = F.dropout(weights, self.dropout) if self.training and self.dropout else weights
        return dropped.to(v.dtype) @ v, weights

    def prefill(self, x, cos, sin, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """Causal attention over a prompt that starts at position 0, filling the cache."""
        q, k, v = self._qkv(x, cos, sin)
        T = x.size(1)
        k_cache[:, :, :T] = k
        v_cache[:, :, :T] = v
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale))

    def decode(self, x, cos, sin, k_cache, v_cache, slot: torch.Tensor, mask: torch.Tensor | None):
        """One new position per sequence: write its key/value to `slot`, attend over valid slots."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache.index_copy_(2, slot, k)
        v_cache.index_copy_(2, slot, v)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, scale=self.scale)
        return self._out(y)

    def _out(self, y):
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, need_weights: bool = False):
        a, weights = self.attn(rms_norm(x), cos, sin, need_weights)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(rms_norm(x))), weights


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

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.head.weight
        return KVCache(self.config, batch, p.device, dtype or p.dtype)

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits of the last position of a prompt (at most block_size long), filling the cache."""
        T = idx.size(1)
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = x + block.attn.prefill(rms_norm(x), self.cos[:T], self.sin[:T], cache.k[i], cache.v[i])
            x = x + block.mlp(rms_norm(x))
        return self.head(rms_norm(x[:, -1:])).float()[:, 0]

    def decode(self, idx: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        """Logits (B, V) for one new token per sequence at absolute position `pos`."""
        cos, sin, slot, mask = cache.step(pos)
        return self.decode_step(idx, cos, sin, slot, mask, cache.k, cache.v)

    def decode_step(self, idx, cos, sin, slot, mask, k_cache, v_cache) -> torch.Tensor:
        """The decode step on tensors alone (no Python ints), so that it can be compiled once."""
        x = self.wte(idx.view(-1, 1))
        for i, block in enumerate(self.blocks):
            x = x + block.attn.decode(rms_norm(x), cos, sin, k_cache[i], v_cache[i], slot, mask)
            x = x + block.mlp(rms_norm(x))
        return self.head(rms_norm(x)).float()[:, 0]

    def compiled_decoder(self):
        """`decode`, compiled with a C++ wrapper: a small model's step is mostly per-op overhead,
        which this removes (nanoGPT's 0.8M shape samples 2.3K instead of 1.1K chars/s here), at
        3-15 s of compiling. Larger models gain nothing (10.7M: 111 vs 186 for the bare step), as
        inductor's one-row matmuls are no faster than eager ones."""
        if "_compiled_step" not in self.__dict__:
            self._compiled_step = torch.compile(self.decode_step, dynamic=False, options={"cpp_wrapper": True})

        def decode(idx: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
            cos, sin, slot, mask = cache.step(pos)
            full = cache.masks[cache.size - 1]  # every slot valid: one graph for the whole generation
            return self._compiled_step(idx, cos, sin, slot, full if mask is None else mask, cache.k, cache.v)
        return decode
