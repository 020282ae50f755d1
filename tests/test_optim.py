import subprocess
import sys

import pytest
import torch

from tfcli.config import ModelConfig, TrainConfig
from tfcli.model import GPT
from tfcli.optim import (
    AdamW,
    Muon,
    _through_gram,
    _through_x,
    is_hidden_matrix,
    make_optimizer,
    newton_schulz,
    uses_gram,
)

SHAPES = [(16, 48), (16, 16), (64, 16), (16, 64), (16, 48)]  # wide, square, tall; repeats batch together


def params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def test_newton_schulz_flattens_the_singular_values_of_every_matrix_in_the_stack():
    g = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(0))
    g = g * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]  # scale must not matter
    s = torch.linalg.svdvals(newton_schulz(g).float())
    assert s.shape == (3, 16)
    assert 0.6 < s.min() and s.max() < 1.25


def test_newton_schulz_keeps_tall_matrices_tall_and_their_singular_vectors():
    g = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(0))  # (unseeded, 1 run in 4 read 0.979)
    o = newton_schulz(g).float()
    assert o.shape == g.shape
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    aligned = torch.einsum("nij,nij->n", o, u @ vh) / (u @ vh).norm(dim=(-2, -1)) / o.norm(dim=(-2, -1))
    assert (aligned > 0.98).all()  # o ≈ U S' Vᵀ with S' near 1: nearly parallel to U Vᵀ


def test_batched_muon_takes_the_same_steps_as_torch_muon():
    ours, theirs = params(), params()
    a = Muon(ours, lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert all("momentum_buffer" in a.state[p] for p in ours)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_takes_the_same_steps_as_torch_adamw(fused):
    ours, theirs = params(), params()
    groups = lambda ps: [{"params": ps[:2], "lr": 0.03}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    a = AdamW(groups(ours), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    b = torch.optim.AdamW(groups(theirs), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for p, q in zip(ours, theirs):
            p.grad = None if (step == 1 and p is ours[0]) else torch.randn(p.shape, generator=g)
            q.grad = None if p.grad is None else p.grad.clone()
        a.step()
        b.step()
        a.zero_grad()
        b.zero_grad()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
        assert a.state[p].keys() == b.state[q].keys()
        for k in a.state[p]:
            torch.testing.assert_close(a.state[p][k], b.state[q][k], atol=0, rtol=0)
    assert all(p.grad is None for p in ours)


def test_a_training_step_does_not_import_torch_dynamo():
    # torch.optim.Optimizer's methods import it (1.5 s), and nothing else in an eager step needs it
    code = ("import sys, torch\n"
            "from tfcli.config import ModelConfig, TrainConfig\n"
            "from tfcli.model import GPT\n"
            "from tfcli.optim import make_optimizer\n"
            "from tfcli.trainer import train_step\n"
            "m = GPT(ModelConfig(11, 1, 2, 16, 8))\n"
            "x = torch.randint(11, (2, 8))\n"
            "for name in ('muon', 'adamw'):\n"
            "    opt = make_optimizer(m, TrainConfig(optimizer=name), torch.device('cpu'))\n"
            "    train_step(m, m, opt, x, x, torch.device('cpu'), torch.float32, 1.0)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_muon_momentum_survives_a_restore_and_a_step_without_some_gradients():
    # the buffers live as slices of one stack per shape; a resume replaces them, and a
    # parameter without a gradient leaves the stack for a step: neither may lose momentum
    ours, theirs = params(), params()
    a = Muon(ours, lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            p.grad = None if step == 2 and i == 0 else torch.randn(p.shape, generator=g)
            q.grad = None if p.grad is None else p.grad.clone()
        if step == 3:
            for p in ours:
                a.state[p] = {k: v.clone() for k, v in a.state[p].items()}
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_muon_skips_parameters_without_gradients():
    ps = params()
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.ones_like(ps[0])
    Muon(ps, lr=0.1).step()
    assert not torch.equal(ps[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(ps[1:], before[1:]))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_every_parameter_is_optimized_once(optimizer):
    model = GPT(ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=16, block_size=8))
    opt = make_optimizer(model, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    ids = sorted(id(p) for p in opt.params())
    assert ids == sorted(id(p) for p in model.parameters())
    if optimizer == "muon":
        muon = opt.optimizers[0]
        hidden = {id(p) for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
        assert {id(p) for g in muon.param_groups for p in g["params"]} == hidden
        outer = [p for n, p in model.named_parameters() if n in ("wte.weight", "head.weight")]
        assert not any(id(p) in hidden for p in outer)


def test_parameters_keep_the_model_order_across_groups():
    # resume state is stored by position in opt.params(): splitting a group must not reorder it
    from conftest import make_model

    from tfcli.config import TrainConfig
    from tfcli.corpus import Vocab
    model = make_model(Vocab.from_text("abc"))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    hidden = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    rest = [p for n, p in model.named_parameters() if not is_hidden_matrix(n, p)]
    assert [id(p) for p in opt.params()] == [id(p) for p in hidden + rest]


def test_newton_schulz_in_float32_flattens_as_well_and_stays_float32():
    g = torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g, dtype=torch.float32)
    assert o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert 0.6 < s.min() and s.max() < 1.25
    torch.testing.assert_close(o, newton_schulz(g).float(), atol=0.05, rtol=0)  # bf16's answer, to its precision


def spread(rows: int, cols: int, decades: int, n: int = 2) -> torch.Tensor:
    """Matrices whose singular values fall evenly (in log) over `decades`, as a gradient's do."""
    g = torch.Generator().manual_seed(0)
    m = min(rows, cols)
    u = torch.linalg.qr(torch.randn(n, rows, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, cols, m, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag_embed(torch.logspace(0, -decades, m, dtype=torch.float64).expand(n, m)) @ v.mT


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_the_gram_iteration_is_the_same_maths_as_the_iteration_on_x(steps):
    x = torch.randn(3, 16, 56, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(_through_gram(x, steps), _through_x(x, steps), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (24, 72)])
@pytest.mark.parametrize("decades", [0, 4, 10])
def test_float32_newton_schulz_stays_close_to_float64s_answer(shape, decades):
    g = spread(*shape, decades)
    exact = newton_schulz(g, dtype=torch.float64)
    got = newton_schulz(g.float(), dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == g.shape
    assert ((got.double() - exact).norm() / exact.norm()) < 1e-3  # (bf16's own error here: ~0.1)


@pytest.mark.parametrize("shape, dtype, expected", [
    ((16, 32), torch.float32, True), ((16, 64), torch.float64, True),
    ((16, 31), torch.float32, False),  # under 2x as wide: the iteration on x costs less
    ((16, 16), torch.float32, False), ((16, 64), torch.bfloat16, False),  # bf16's rounding compounds
])
def test_only_wide_float32_stacks_iterate_on_the_gram_matrix(shape, dtype, expected):
    assert uses_gram(torch.zeros(2, *shape, dtype=dtype), dtype) is expected


@pytest.mark.parametrize("shape, expected", [((64, 16), True), ((16, 64), True), ((16, 16), False)])
def test_newton_schulz_takes_the_gram_path_for_tall_stacks_as_for_wide_ones(monkeypatch, shape, expected):
    from tfcli import optim
    taken = []
    real = optim._through_gram
    monkeypatch.setattr(optim, "_through_gram", lambda x, steps: taken.append(x.shape) or real(x, steps))
    out = newton_schulz(torch.randn(2, *shape), dtype=torch.float32)
    assert out.shape == (2, *shape)
    assert taken == ([(2, min(shape), max(shape))] if expected else [])


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_muon_orthogonalises_in_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, native_bf16, expected):
    # an AVX2-only CPU emulates bf16 products ~100x slower than float32: --time 60 trained 40 steps, not 145
    from tfcli import native
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: native_bf16)
    model = GPT(ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=16, block_size=8))
    muon = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers[0]
    assert muon.ns_dtype == expected
    seen = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a, **k: seen.append(a[0].dtype) or real(*a, **k))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    muon.step()
    assert seen and set(seen) == {expected}
