import platform
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from tfcli import causal_attention
from tfcli.corpus import Vocab
from tfcli.device import can_compile, compile_model

PLACEMENT = """
import ctypes, sys, torch
from tfcli.device import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
t = torch.empty(16 << 20, dtype=torch.uint8)  # an activation-sized block
from_heap = t.data_ptr() < libc.sbrk(0)  # not a fresh mapping of its own
top = libc.sbrk(0)
del t
print(applied, from_heap, libc.sbrk(0) == top)  # and the heap still holds it after the free
"""


def placement(mode: str) -> list[str]:
    return subprocess.run([sys.executable, "-c", PLACEMENT, mode], capture_output=True, text=True,
                          check=True).stdout.split()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_stays_in_the_heap_for_the_next_step():
    # By default glibc maps a 16 MB block on its own and unmaps it when freed, so the next step
    # faults its pages in again; kept, it comes from the heap and stays there.
    assert placement("keep") == ["True", "True", "True"]
    assert placement("default")[:2] == ["False", "False"]


def test_training_and_evaluation_keep_freed_memory(monkeypatch, tmp_path):
    import tfcli.evaluation as evaluation
    import tfcli.trainer as trainer
    from tfcli.config import ModelConfig, TrainConfig
    from tfcli.corpus import load_corpus
    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append("train"))
    monkeypatch.setattr(evaluation, "keep_freed_memory", lambda: calls.append("evaluate"))
    (tmp_path / "t.txt").write_text("abcabd" * 100)
    trainer.train(load_corpus([tmp_path / "t.txt"]), ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8),
                  TrainConfig(max_steps=2, batch_size=4, device="cpu", dtype="float32", sample_chars=0),
                  tmp_path / "run")
    assert calls[0] == "train" and "evaluate" in calls  # before the first step; the final evaluation too


@pytest.mark.slow  # compiling takes seconds
@pytest.mark.skipif(not can_compile(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_step_gives_eager_loss_and_gradients(monkeypatch):
    monkeypatch.setattr(causal_attention, "CHUNK", 16)  # a context of 40: three blocks of queries
    monkeypatch.setattr(causal_attention, "pays", lambda q, dropout: True)  # (eager float32 would take the fused)
    model = make_model(Vocab("abcdefgh"), block_size=40).train()
    ids, targets = torch.randint(8, (3, 40)), torch.randint(8, (3, 40))
    results = []
    for net in (model, compile_model(model)):
        model.zero_grad()
        _, loss = net(ids, targets)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for compiled, eager in zip(*results[::-1]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seconds, steps, compiles", [
    (300, None, True), (60, None, False),          # a 5-minute run repays a compile; a minute does not
    (None, 5000, True), (None, 200, False),
    (5400, 2, False), (5400, 5000, True),         # the run ends at whichever limit comes first
    (None, None, False),                           # (epochs only: its length is not known here)
])
def test_compile_is_the_default_only_when_every_limit_given_is_long_enough(monkeypatch, seconds, steps, compiles):
    from tfcli import device
    monkeypatch.setattr(device, "can_compile", lambda: True)
    assert device.should_compile(torch.device("cpu"), None, seconds, steps) is compiles
    assert device.should_compile(torch.device("cpu"), True, seconds, steps) is True  # asked: always


def test_a_gpu_index_this_machine_lacks_is_named_with_the_ones_it_has(monkeypatch):
    from tfcli.device import pick_device
    from tfcli.errors import UsageError, command_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match=r"device='cuda:5': this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        pick_device("cuda:5")
    with command_line(), pytest.raises(UsageError, match=r"^--device cuda:5: this machine has 2 CUDA GPUs"):
        pick_device("cuda:5")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="^device='cuda:1' asked for, but this .* use device='cpu'$"):
        pick_device("cuda:1")
    with command_line(), pytest.raises(UsageError, match="--device cuda:1 asked for, .* use --device cpu$"):
        pick_device("cuda:1")


def test_bf16_is_picked_on_a_cpu_only_where_it_computes_bf16_natively(monkeypatch):
    from tfcli import native
    from tfcli.device import pick_dtype

    cpu = torch.device("cpu")
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: False)
    assert pick_dtype(cpu) == torch.float32  # (bf16 emulated on AVX2 is many times slower)
    monkeypatch.setattr(native, "cpu_has_native_bf16", lambda: True)
    assert pick_dtype(cpu) == torch.bfloat16
    assert pick_dtype(cpu, "float32") == torch.float32
