"""The CLI under real signals and closed pipes, in real subprocesses.

Ctrl-C (SIGINT) or SIGTERM during training must save a loadable checkpoint, say how
to resume, and exit 130 or 143; a second signal quits at once, leaving the last checkpoint
whole; a reader closing the pipe (`| head`) ends sampling quietly, and stops training as
Ctrl-C does (saved, with the command that resumes it).
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tfcli.checkpoint import load_checkpoint, load_state
from tfcli.cli import app
from tfcli.stopping import Terminated

NAMES = ["anna", "bob", "carla", "dave", "eve", "frank", "gina", "hugo", "ines", "jack", "kara", "liam"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def tfcli(*args) -> list[str]:
    return [sys.executable, "-m", "tfcli", *map(str, args)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "names.txt"
    path.write_text("\n".join(f"{rng.choice(NAMES)} {rng.choice(NAMES)}" for _ in range(300)) + "\n")
    return path


def wait_for_steps(proc: subprocess.Popen, metrics: Path, timeout: float = 60.0) -> None:
    """Until training has logged a step (metrics.jsonl exists), so the signal lands mid-training."""
    deadline = time.monotonic() + timeout
    while not metrics.exists():
        assert proc.poll() is None, "training ended before it was signalled"
        assert time.monotonic() < deadline, "no training step logged in time"
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_training_saves_and_says_how_to_resume(corpus, tmp_path, signum, code):
    out = tmp_path / "run"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        args = ("train", corpus, "--preset", "tiny", "--time", "60", "--no-compile", "--out", out)
        proc = subprocess.Popen(tfcli(*args),
                                stdout=so, stderr=se, env=ENV, cwd=tmp_path)
        try:
            wait_for_steps(proc, out / "metrics.jsonl")
            proc.send_signal(signum)
            assert proc.wait(timeout=30) == code
        finally:
            proc.kill()
            proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert "--resume" in stderr and "Traceback" not in stderr
    left = re.search(r"--resume --time (\d+)s", stderr)  # the rest of its 60 s, not a fresh default budget
    assert left and 0 < int(left.group(1)) < 60
    ck = load_checkpoint(out / "model.safetensors")
    assert ck.summary["step"] > 0 and ck.summary["ended"] == "interrupted"
    assert "\x1b[" not in (tmp_path / "stdout").read_text()
    resumed = subprocess.run(tfcli("train", corpus, "--out", out, "--resume", "--max-steps", ck.summary["step"] + 2),
                             capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "model.safetensors").summary["step"] == ck.summary["step"] + 2


def test_the_printed_resume_command_resumes_the_run_when_pasted(corpus, tmp_path):
    # paths that need quoting, and a split that only --val-fraction gives: without it the resumed
    # run would see another corpus and be refused
    folder = tmp_path / "my texts"
    folder.mkdir()
    text = corpus.rename(folder / "names ü.txt")
    out = tmp_path / "out sp"
    args = ("train", text, "--preset", "tiny", "--time", "60", "--no-compile", "--val-fraction", "0.2", "--out", out)
    proc = subprocess.Popen(tfcli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=tmp_path)
    try:
        wait_for_steps(proc, out / "metrics.jsonl")
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
        proc.wait()
    command = shlex.split(stderr.strip().splitlines()[-1])
    assert command[:2] == ["tfcli", "train"] and "--val-fraction" in command
    step = load_checkpoint(out / "model.safetensors").summary["step"]
    resumed = subprocess.run(tfcli(*command[1:], "--max-steps", step + 2), capture_output=True, text=True, env=ENV,
                             cwd=tmp_path, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "model.safetensors").summary["step"] == step + 2


def test_ctrl_c_while_the_program_loads_is_an_interruption_not_a_crash(corpus, tmp_path):
    # early signals land in the middle of imports (typer, rich, torch, numpy): each must end as 'interrupted'
    codes = []
    for delay in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):  # (each in a run directory of its own)
        out = tmp_path / f"r{delay}"
        proc = subprocess.Popen(tfcli("train", corpus, "--preset", "tiny", "--max-steps", "5", "--out", out),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
        codes.append(proc.returncode)
        if proc.returncode == 0:  # it finished first
            continue
        if "KeyboardInterrupt" in stderr and f"{os.sep}tfcli{os.sep}" not in stderr:
            continue  # CPython's start-up, before a line of tfcli ran (runpy finding the package; seen at 0.05 s
            # on a loaded host): an interpreter's traceback no program can catch
        assert proc.returncode in (130, -signal.SIGINT), (delay, proc.returncode, stderr)  # (-2: before Python ran)
        assert "Traceback" not in stderr and "Error" not in stderr, (delay, stderr)
    assert 130 in codes, codes  # (torch's import alone outlasts the longest delay: some landed in Python)


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_second_signal_quits_at_once_and_keeps_the_last_checkpoint(corpus, tmp_path, signum, code):
    out = tmp_path / "run"
    err = tmp_path / "stderr"
    # steps of about a second, so the second signal lands while the first one's step still runs (the save
    # follows the step at once: a step of a few tenths left too small a window)
    args = ("train", corpus, "--n-layer", "4", "--n-head", "2", "--n-embd", "256", "--block-size", "128",
            "--batch-size", "64", "--time", "60", "--no-compile", "--eval-interval", "0.5", "--out", out)
    with open(err, "w") as se:
        proc = subprocess.Popen(tfcli(*args), stdout=subprocess.DEVNULL, stderr=se, env=ENV, cwd=tmp_path)
        try:
            wait_until(proc, (out / "model.safetensors").exists, "a first checkpoint")
            proc.send_signal(signum)
            wait_until(proc, lambda: "stopping after this step" in err.read_text(), "the first signal's notice")
            proc.send_signal(signum)
            assert proc.wait(timeout=30) == code
        finally:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert "Traceback" not in stderr and "nothing was saved yet" not in stderr
    assert "checkpoint saved at step" not in stderr  # it quit without finishing the step and saving again
    assert load_checkpoint(out / "model.safetensors").summary["step"] >= 1  # what was on disk is whole
    assert load_state(out / "state.safetensors")[1]["step"] >= 1  # and resumable


def test_second_signal_before_the_first_save_says_there_is_nothing_to_resume(corpus, tmp_path):
    out, err = tmp_path / "run", tmp_path / "stderr"
    args = ("train", corpus, "--n-layer", "4", "--n-head", "2", "--n-embd", "256", "--block-size", "128",
            "--batch-size", "64", "--time", "60", "--no-compile", "--eval-interval", "600", "--out", out)
    with open(err, "w") as se:
        proc = subprocess.Popen(tfcli(*args), stdout=subprocess.DEVNULL, stderr=se, env=ENV, cwd=tmp_path)
        try:
            wait_for_steps(proc, out / "metrics.jsonl")
            proc.send_signal(signal.SIGINT)
            wait_until(proc, lambda: "stopping after this step" in err.read_text(), "the first signal's notice")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            proc.kill()
            proc.wait()
    stderr = err.read_text()
    assert "nothing was saved yet; run the same command to start again" in stderr and "Traceback" not in stderr
    assert not (out / "model.safetensors").exists()


def test_training_into_a_closed_pipe_stops_saves_and_says_how_to_resume(corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(tfcli("train", corpus, "--preset", "tiny", "--time", "60", "--no-compile", "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path)
    try:
        proc.stdout.readline()
        proc.stdout.close()  # what `tfcli train ... | head -1` does: the run's next line has no reader
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, stderr
    finally:
        proc.kill()
        proc.wait()
    assert "--resume" in stderr and "Traceback" not in stderr
    assert load_checkpoint(out / "model.safetensors").summary["ended"] == "interrupted"  # the work is kept


def test_a_reader_leaving_after_the_last_step_still_gets_the_closed_pipe_code(corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(tfcli("train", corpus, "--preset", "tiny", "--max-steps", "20", "--out", out),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    try:
        while not re.match(r"step +20 +val ", proc.stdout.readline()):  # the final validation; sample, summary follow
            assert proc.poll() is None
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 128 + signal.SIGPIPE, stderr
    finally:
        proc.kill()
        proc.wait()
    assert load_checkpoint(out / "model.safetensors").summary["ended"] == "steps"


def test_ctrl_c_after_the_reader_left_is_still_a_first_ctrl_c():
    from tfcli.commands.train import StopFlag
    stop = StopFlag(quiet=True)
    assert not stop() and stop.exit_code == 130  # (the trainer's poll after a step: mid-run)
    stop.reader_left = True  # (what reader_gone records, without pointing this process's stdout at /dev/null)
    assert stop() and stop.exit_code == 128 + signal.SIGPIPE
    stop.handle(signal.SIGINT, None)  # finishes the step and saves, rather than quitting at once
    assert stop.exit_code == 130
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)


def test_ctrl_c_during_the_final_validation_of_a_finished_run_still_exits_130(corpus, tmp_path, monkeypatch):
    from tfcli import trainer
    real = trainer.train

    def interrupted_at_the_end(*args, **kwargs):
        done = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as if during the final validation: the steps are all done
        return done
    monkeypatch.setattr(trainer, "train", interrupted_at_the_end)
    result = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 130, result.output  # (it was 0: a shell never learnt of the Ctrl-C)
    assert "reached --max-steps" in result.output and (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("signal_, code", [(KeyboardInterrupt, 130), (Terminated, 143)])
def test_a_stop_before_the_first_step_says_in_one_line_what_is_on_disk(corpus, tmp_path, monkeypatch, signal_, code):
    from tfcli import trainer
    real = trainer.train

    def stopped_at_once(*args, **kwargs):
        raise signal_  # what the first Ctrl-C or SIGTERM does before a step has ended (a compile, say)
    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "train", stopped_at_once)
    result = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2", "--out", str(out)])
    assert result.exit_code == code
    label = "interrupted" if code == 130 else "terminated"  # (not "error": the user asked for it)
    assert [line for line in result.output.splitlines() if line.startswith((label, "error"))] == [
        f"{label}: nothing was saved yet; run the same command to start again"]
    monkeypatch.setattr(trainer, "train", real)
    assert CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                    "--out", str(out)]).exit_code == 0
    monkeypatch.setattr(trainer, "train", stopped_at_once)
    result = CliRunner().invoke(app, ["train", str(corpus), "--max-steps", "4", "--out", str(out), "--resume"])
    assert result.exit_code == code
    assert [line for line in result.output.splitlines() if line.startswith((label, "error"))] == [
        f"{label}: no step was taken; {out} is as the last session saved it"]


def test_sample_into_a_closed_pipe_exits_quietly(corpus, tmp_path):
    trained = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    # more than a pipe buffer (64 KiB) of output, so the writer does hit the closed pipe
    for extra in (["-n", "100000"], ["-n", "1000", "--num-samples", "80", "--no-stream"],
                  ["-n", "1000", "--num-samples", "80", "--json"]):
        proc = subprocess.Popen(tfcli("sample", "-m", tmp_path / "run", "-p", "anna", "--seed", "1", *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        head = proc.stdout.read(20)
        proc.stdout.close()  # what `| head -c 20` does
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, stderr
        assert len(head) == 20 and "Traceback" not in stderr and "error" not in stderr.lower(), stderr


def test_a_batch_for_a_pipe_stops_once_its_reader_has_gone(corpus, tmp_path):
    trained = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    # nothing prints before a batch is done (minutes here), so only the pipe itself says the reader left
    proc = subprocess.Popen(tfcli("sample", "-m", tmp_path / "run", "-p", "anna", "-n", "10000000",
                                  "--num-samples", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert proc.stderr.readline().startswith(b"seed ")  # generating
        proc.stdout.close()
        assert proc.wait(timeout=30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("signum, code, said, extras", [
    (signal.SIGINT, 130, "interrupted",
     ([], ["--no-stream"], ["--num-samples", "2"], ["--num-samples", "2", "--json"])),
    (signal.SIGTERM, 143, "terminated", ([], ["--num-samples", "2", "--json"])),  # (`timeout`'s signal)
])
def test_ctrl_c_or_sigterm_during_a_sample_or_batch_shows_what_was_made_then_exits(corpus, tmp_path, signum, code,
                                                                                    said, extras):
    trained = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    for extra in extras:
        proc = subprocess.Popen(tfcli("sample", "-m", tmp_path / "run", "-p", "anna", "-n", "10000000", *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        seed = proc.stderr.readline()  # printed once the model is loaded, as generation starts
        assert seed.startswith("seed "), seed
        time.sleep(1)  # generating: it would take minutes to finish
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code and said in err and "Traceback" not in err, err
        if "--json" in extra:
            records = [json.loads(line) for line in out.splitlines()]
            assert len(records) == 2 and all(len(r["text"]) > 10 for r in records)
            assert all(r["finish_reason"] == "interrupted" for r in records)
        else:
            assert out.startswith("anna") or "sample 1/2" in out
            assert len(out) > 20 and out.endswith("\n")  # (the message after it starts its own line)


def test_an_allocators_refusal_is_said_to_be_out_of_memory_in_words():
    from tfcli.commands.common import out_of_memory
    torch_cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                             "you tried to allocate 52428800000 bytes. Error code 12 (Cannot allocate memory)")
    assert out_of_memory(torch_cpu) == "could not allocate 48.8 GiB"
    numpy = MemoryError("Unable to allocate 48.8 GiB for an array with shape (100000, 256) and data type float32")
    assert out_of_memory(numpy) == "could not allocate " + str(numpy).removeprefix("Unable to allocate ")
    assert out_of_memory(MemoryError()) == "could not allocate memory"
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("x")) is None


def test_sample_that_runs_out_of_memory_says_so_and_what_to_ask_for(corpus, tmp_path, monkeypatch):
    trained = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output

    def refused(*args, **kwargs):
        raise MemoryError("Unable to allocate 97.7 GiB for an array with shape (100000, 4, 64) and data type float32")
    monkeypatch.setattr("tfcli.sampling.new_decoder", refused)
    result = CliRunner().invoke(app, ["sample", "-m", str(tmp_path / "run"), "--num-samples", "100000", "-n", "1"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: out of memory: could not allocate 97.7 GiB" in result.stderr
    assert "; ask for less (fewer --num-samples, or a smaller model)" in result.stderr


@pytest.mark.parametrize("n", ["10000000", "5"])  # SIGTERM while it generates, and at its prompt
def test_sigterm_ends_an_interactive_session_with_143(corpus, tmp_path, n):
    trained = CliRunner().invoke(app, ["train", str(corpus), "--preset", "tiny", "--max-steps", "2",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    proc = subprocess.Popen(tfcli("sample", "-m", tmp_path / "run", "-i", "-p", "anna", "-n", n, "--seed", "1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        assert proc.stdout.read(6).startswith(b"anna")  # generating
        time.sleep(1)  # (with -n 5, waiting for a line by now)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143  # (Ctrl-C would only stop the text: SIGTERM ends the session)
        assert b"Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_an_output_encoding_without_tfcli_s_symbols_escapes_them(corpus, tmp_path):
    """An ASCII locale or a cp1252 console: the sample line's ⏎ ended training at its first validation."""
    env = {**ENV, "PYTHONIOENCODING": "ascii"}
    run = subprocess.run(tfcli("train", corpus, "--preset", "tiny", "--max-steps", "4", "--eval-steps", "2",
                               "--out", tmp_path / "r"), capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0 and "\\u23ce" in run.stdout, run.stderr  # (the sample line's line ends)
    info = subprocess.run(tfcli("info", "-m", tmp_path / "r"), capture_output=True, text=True, env=env)
    assert info.returncode == 0 and "vocabulary: \\u23ce\\u2423" in info.stdout, info.stderr


def test_a_closed_stdin_reads_as_an_empty_one(corpus, tmp_path):
    """`<&-` left sys.stdin None: every command that reads it said AttributeError."""
    subprocess.run(tfcli("train", corpus, "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r"),
                   check=True, capture_output=True, env=ENV)

    def closed_stdin(*args) -> subprocess.CompletedProcess:
        return subprocess.run(tfcli(*args), capture_output=True, text=True, env=ENV,
                              preexec_fn=lambda: os.close(0))
    evaluated = closed_stdin("eval", "-", "-m", tmp_path / "r")
    assert (evaluated.returncode, evaluated.stderr) == (2, "error: stdin: empty corpus, no text to read\n")
    session = closed_stdin("sample", "-m", tmp_path / "r", "-i", "-p", "anna", "-n", "5", "--seed", "1")
    assert session.returncode == 0 and session.stdout.startswith("anna"), session.stderr  # (ends as at EOF)


@pytest.mark.parametrize("args", [["--help"], ["sample", "--help"]])
def test_help_to_a_reader_already_gone_is_not_a_failure(args):
    """`tfcli --help | true`: click exits 1 when the pipe is closed; `sample | head` is 0, and so is this."""
    read, write = os.pipe()
    os.close(read)  # (gone before a byte is written: the write fails every time, not by a race)
    try:
        done = subprocess.run(tfcli(*args), stdout=write, stderr=subprocess.PIPE, text=True, env=ENV, timeout=60)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


def test_sampled_text_the_output_encoding_cannot_hold_is_refused_not_escaped(corpus, tmp_path):
    """Escaped, what sample makes would be other text with exit 0: one line naming the fix instead."""
    (tmp_path / "accents.txt").write_text("un café noir\n" * 200)
    subprocess.run(tfcli("train", tmp_path / "accents.txt", "--preset", "tiny", "--max-steps", "2", "--out",
                         tmp_path / "r"), check=True, capture_output=True, env=ENV)
    done = subprocess.run(tfcli("sample", "-m", tmp_path / "r", "-p", "café", "-n", "5", "--seed", "1"),
                          capture_output=True, text=True, env={**ENV, "PYTHONIOENCODING": "ascii"})
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("error: the output's encoding (ascii) cannot write '\\xe9'; set PYTHONIOENCODING=utf-8 "
                           "or use a UTF-8 locale\n")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device every write to fails")
def test_a_full_disk_under_the_output_is_said_in_words(corpus, tmp_path):
    """`> /dev/full` was `error: OSError: [Errno 28] No space left on device (rerun as ...)`."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(tfcli("train", corpus, "--preset", "tiny", "--max-steps", "2", "--out", tmp_path / "r"),
                              stdout=full, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, "error: cannot write (no space left on device)\n")
