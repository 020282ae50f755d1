"""The decode step on a CUDA GPU, recorded once as a CUDA graph and replayed per character.

A character model's step is about a hundred tiny kernels, each launched from Python: on an
H100 the eager step of the 10.7M shape ran at ~480 characters/s, slower than a laptop CPU, with
the GPU idle between launches. A graph launches them all in one call. It needs every tensor the
step reads at a fixed address, so the step reads the whole ring through a mask (as the compiled
step does) and each character's inputs are copied into buffers the graph was recorded with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .model import GPT, KVCache, cached_step


def runs(device: torch.device) -> bool:
    return device.type == "cuda"


def decoder(model: GPT, cache: KVCache, compile: bool = False) -> Callable[[torch.Tensor, int, KVCache], torch.Tensor]:
    """`model.decode` for this cache, replaying one recorded step (with `compile`, of the compiled
    step: fewer, fused kernels). Recording runs the step twice, then records it, on slot 0 of an
    empty ring, which the prefill that must come next overwrites."""
    B, T = cache.kv.size(2), cache.size
    cos0, sin0, slot0, _ = cache.step(0)
    idx = torch.zeros(B, 1, dtype=torch.long, device=cache.kv.device)
    cos, sin, slot, mask = cos0.clone(), sin0.clone(), slot0.clone(), cache.masks[0].clone()
    weights, n_head = cache.weights, model.config.n_head
    compiled = model.compiled_step(cache) if compile else None

    def step() -> torch.Tensor:
        if compiled is not None:
            return compiled(idx, cos, sin, slot, mask, cache.kv)
        return cached_step(idx, cos, sin, slot, mask, cache.kv, weights, n_head)

    device = cache.kv.device
    with torch.cuda.device(device):  # capture and replay use the current device's streams (cuda:1 too)
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture wants
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):  # (torch's default capture stream is made once, on
            logits = step()                          # the first device that records: not this one's)

    def decode(ids: torch.Tensor, pos: int, cache: KVCache) -> torch.Tensor:
        c, s, sl, _ = cache.step(pos)
        idx.copy_(ids.view(B, 1))
        cos.copy_(c)
        sin.copy_(s)
        slot.copy_(sl)
        mask.copy_(cache.masks[min(pos, T - 1)])
        with torch.cuda.device(device):
            graph.replay()
        return logits  # overwritten by the next replay: the caller copies it out first
    return decode
