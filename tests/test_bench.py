"""The benchmark's report, on shapes small enough for a test (no speed is asserted)."""

import io
import json

from typer.testing import CliRunner

import tfcli.bench as bench
from tfcli.cli import app


def test_bench_json_reports_every_figure_the_issue_names(monkeypatch):
    monkeypatch.setattr(bench, "SHAPES", {"0.8M": bench.Shape(1, 1, 16, 8, 2), "4.8M": bench.Shape(1, 2, 16, 8, 2),
                                          "10.7M": bench.Shape(2, 2, 16, 8, 2)})
    monkeypatch.setattr(bench, "peak_gflops", lambda *a, **k: 100.0)
    result = CliRunner().invoke(app, ["bench", "--json", "--no-compile", "--seconds", "0.05", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["train"]) == {"0.8M", "4.8M", "10.7M"}
    stages = [line for line in result.stderr.splitlines() if line.startswith("bench: ")]  # as each part starts
    assert stages == ["bench: probing peak GFLOP/s…", "bench: training 0.8M…", "bench: training 4.8M…",
                      "bench: training 10.7M…", "bench: sampling 0.8M…", "bench: sampling 10.7M…"]
    for r in report["train"].values():
        assert r["tokens_per_s"] > 0 and r["gflops"] > 0
        assert abs(r["peak_fraction"] - r["gflops"] / 100.0) < 1e-9
    assert set(report["sample"]) == {"0.8M", "10.7M"}
    for s in report["sample"].values():
        assert s["chars_per_s"] > 0 and s["num_samples_16_cost"] > 0 and s["dtype"] == "float32"
        assert s["num_samples_16_dtype"] in ("float32", "bfloat16")
        assert s["first_char_s"] > 0  # a real `tfcli sample` in a new process: it ran to its first character
    assert report["device"] == "cpu" and isinstance(report["decode_kernel"], bool)
    assert set(report["decode_matmul"]) <= {"float16", "float32", "bfloat16", "bfloat16 on AMX"}


def test_bench_table_has_a_column_per_figure(monkeypatch):
    report = {
        "device": "cpu", "dtype": "bfloat16", "compile": True, "peak_gflops": 400.0,
        "train": {"0.8M": {"tokens_per_s": 20000.0, "gflops": 100.0, "params": 800000, "peak_fraction": 0.25}},
        "sample": {"0.8M": {"chars_per_s": 2100.0, "dtype": "float32", "num_samples_16_cost": 2.0,
                            "num_samples_16_dtype": "bfloat16", "compiled_chars_per_s": 2800.0,
                            "first_char_s": 0.47}}, "decode_kernel": True,
        "decode_matmul": ["float16", "bfloat16"]}
    monkeypatch.setattr(bench, "run", lambda *a, **k: report)
    result = CliRunner().invoke(app, ["bench"])  # (not a terminal: plain columns, none cut to 80)
    assert result.exit_code == 0, result.output
    assert not set("┃━│─┏┗") & set(result.output)
    assert all(line == line.rstrip() for line in result.stdout.splitlines())  # (it padded every line to 113)
    row = next(line for line in result.output.splitlines() if "0.8M" in line)
    for figure in ("20,000", "100 (25%)", "2,100", "fp32", "2,800", "2.0x (bf16)", "0.47 s"):
        assert figure in row
    assert "(float16, bfloat16)" in " ".join(result.output.split())  # the caption names the C matmuls' dtypes
    assert "sampling attends through tfcli's C kernel" in result.output
    assert "training in bfloat16, compiled; peak 400 GFLOP/s" in result.output
    monkeypatch.setattr(bench, "run", lambda *a, **k: {**report, "compile": False})
    assert "training in bfloat16, uncompiled; peak" in CliRunner().invoke(app, ["bench"]).output  # (said nothing)


def test_bench_table_fits_an_80_column_terminal_leaving_out_what_was_not_measured():
    """At 80 columns every header and figure was cut: `(floa…`, `GFLOP…`, `--com…`."""
    from rich.console import Console

    from tfcli.commands.bench import bench_table
    sample = {"chars_per_s": 1011.0, "dtype": "float16", "num_samples_16_cost": 5.1,
              "num_samples_16_dtype": "bfloat16", "first_char_s": 0.61}
    report = {"device": "cpu", "dtype": "float32", "compile": True, "peak_gflops": 153.0, "decode_kernel": True,
              "decode_matmul": ["float16", "bfloat16"],
              "train": {name: {"tokens_per_s": 12728.0, "gflops": 95.0, "params": 10_650_000, "peak_fraction": 0.62}
                        for name in ("0.8M", "4.8M", "10.7M")},
              "sample": {"0.8M": dict(sample, chars_per_s=4537.0), "10.7M": sample}}

    def shown(report: dict) -> str:
        console = Console(width=80, force_terminal=True, color_system=None, record=True, file=io.StringIO())
        console.print(bench_table(report, plain=False))
        text = console.export_text()
        assert "…" not in text and max(map(len, text.splitlines())) <= 80
        return text
    text = shown(report)
    assert "--compile" not in text.split("sampling attends")[0]  # (no column of dashes: the caption says why)
    row = next(line for line in text.splitlines() if line.strip().startswith("10.7M"))
    assert row.split() == ["10.7M", "10.65M", "12,728", "95", "(62%)", "1,011", "fp16", "5.1x", "(bf16)", "0.61", "s"]
    gpu = {**report, "device": "cuda", "peak_gflops": 712_345.0, "decode_kernel": False,  # (every column there is)
           "train": {name: {**r, "tokens_per_s": 1_234_567.0, "gflops": 123_456.0}
                     for name, r in report["train"].items()},
           "sample": {name: {k: v for k, v in {**s, "compiled_chars_per_s": 23_456.0}.items() if k != "first_char_s"}
                      for name, s in report["sample"].items()}}  # (a GPU's first character is not measured)
    assert "--compile" in shown(gpu) and "23,456" in shown(gpu)


def test_sample_speed_takes_batch_sizes_in_turn_and_reports_paired_ratios(monkeypatch):
    order = []
    real = bench.generate

    def watched(model, vocab, prompt, cfg):
        order.append(cfg.num_samples)
        return real(model, vocab, prompt, cfg)
    monkeypatch.setattr(bench, "generate", watched)
    one, three = bench.sample_speed(bench.Shape(1, 1, 16, 8, 2), "cpu", n_chars=5, reps=3, batches=(1, 3))
    assert order == [1, 3] * 3  # (a drift in the host's speed weighs on both alike)
    assert one["cost"] == 1.0 and three["cost"] > 0 and one["chars_per_s"] > 0 and three["chars_per_s"] > 0


def test_a_compiler_that_cannot_build_is_benched_as_train_runs_then_uncompiled(monkeypatch):
    import torch
    from torch._inductor.exc import InductorError, InvalidCxxCompiler

    def unbuildable(*args, **kwargs):
        raise InductorError(InvalidCxxCompiler(), None)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: unbuildable)
    monkeypatch.setattr("tfcli.device.can_compile", lambda: True)
    stages = []
    report = bench.run("cpu", "float32", None, ["4.8M"], seconds=0.3, on_stage=stages.append)
    assert report["compile"] is False and report["train"]["4.8M"]["tokens_per_s"] > 0
    assert any(s.startswith("torch.compile could not build (InvalidCxxCompiler") for s in stages), stages
