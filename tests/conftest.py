"""Shared fixtures: tiny models and small synthetic corpora, so every test runs in milliseconds."""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tfcli.config import ModelConfig
from tfcli.corpus import Vocab
from tfcli.model import GPT, rms_norm, rope_angles

# Property tests: no per-example deadline (a shared 2-core machine stalls at random), and in CI
# a fixed example sequence, so a red CI always means the same thing when re-run.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


# Tiny matrices gain nothing from threads, and on a busy machine OpenMP's barriers make each
# matmul of a 2-thread pool wait for a time slice (measured: 23 ms instead of 80 us).
torch.set_num_threads(1)

TEXT = "hello world\n" * 40
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def make_model(vocab: Vocab, n_layer: int = 2, n_head: int = 2, n_embd: int = 32, block_size: int = 16,
               std: float | None = 0.2, seed: int = 0) -> GPT:
    """A GPT with `model.vocab` set; `std` re-draws every weight (the zero-init outputs would hide bugs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=len(vocab), n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                      block_size=block_size).validate()
    model = GPT(cfg)
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, std)
    model.vocab = vocab
    return model.eval()


@pytest.fixture
def vocab() -> Vocab:
    return Vocab.from_text(TEXT)


@pytest.fixture
def model(vocab) -> GPT:
    """A random (non-zero) 2-layer model over the vocabulary of TEXT."""
    return make_model(vocab)


@pytest.fixture
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    return SHAKESPEARE


def windowed_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Reference for generation past the context: every layer attends to the last block_size positions only."""
    T, W = idx.size(1), model.config.block_size
    cos, sin = rope_angles(torch.arange(T), model.config.head_dim)
    q_pos, k_pos = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (k_pos <= q_pos) & (k_pos > q_pos - W)  # (T, T)
    x = model.wte(idx)
    for block in model.blocks:
        q, k, v = block.attn._qkv(rms_norm(x), cos, sin)
        w = (q @ k.transpose(-2, -1) * block.attn.scale).masked_fill(~band, float("-inf")).softmax(-1)
        x = x + block.attn._out(w @ v)
        x = x + block.mlp(rms_norm(x))
    return model.logits_from_hidden(x)


def use_consoles(monkeypatch, stdout=None, stderr=None) -> None:
    """Point the commands at a test's consoles: each command module binds commands.common's own."""
    import importlib
    import pkgutil

    import tfcli.commands as commands

    for found in pkgutil.iter_modules(commands.__path__):
        module = importlib.import_module(f"tfcli.commands.{found.name}")
        for name, console in (("stdout", stdout), ("stderr", stderr)):
            if console is not None and hasattr(module, name):
                monkeypatch.setattr(module, name, console)
