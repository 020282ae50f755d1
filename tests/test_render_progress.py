"""The training log: its closing line and its estimate of the time left."""

import os
import sys
from dataclasses import replace

import pytest

from tfcli.events import Done, Step
from tfcli.render.progress import Eta, LiveProgress, describe_done


def test_done_line_points_to_the_best_model_when_validation_rose_well_after_it(tmp_path):
    done = Done(step=500, val_loss=2.4, best_val_loss=1.5, elapsed=60.0, run_dir=tmp_path, reason="time",
                best_step=120)
    first, second = describe_done(done).splitlines()
    assert first.startswith("done: 500 steps") and "val loss 2.4000" in first
    assert "best val loss 1.5000 at step 120" in second and f"-m {tmp_path / 'best.safetensors'}" in second


def test_done_line_stays_one_line_when_the_last_model_is_about_the_best(tmp_path):
    done = Done(step=500, val_loss=1.51, best_val_loss=1.5, elapsed=60.0, run_dir=tmp_path, reason="time",
                best_step=480)
    assert len(describe_done(done).splitlines()) == 1
    assert len(describe_done(replace(done, val_loss=None, best_val_loss=None)).splitlines()) == 1


def test_done_line_of_an_interrupted_run_says_where_its_validation_was(tmp_path):
    done = Done(step=57, val_loss=1.9, best_val_loss=1.9, elapsed=60.0, run_dir=tmp_path, reason="interrupted",
                best_step=50, val_step=50)
    assert "(interrupted), last val loss 1.9000 (2.741 bits/char) at step 50;" in describe_done(done)
    assert ", val loss 1.9000 (2.741 bits/char);" in describe_done(replace(done, val_step=57))


def test_done_line_says_when_the_model_has_barely_learnt(tmp_path):
    done = Done(step=11, val_loss=4.05, best_val_loss=4.05, elapsed=53.0, run_dir=tmp_path, reason="time")
    assert "barely learnt yet: a uniform guess over its 72 characters scores 4.28" in describe_done(done, 72)
    assert "for longer (a new run with more --time: a resumed one goes on at the end" in describe_done(done, 72)
    assert "--resume" not in describe_done(done, 72)  # (a run that ended as planned resumes at its schedule's floor)
    assert describe_done(replace(done, reason="interrupted"), 72).endswith("train it for longer (--resume to go on)")
    assert "barely" not in describe_done(replace(done, val_loss=2.1), 72)  # (learning)
    assert "barely" not in describe_done(done) and "barely" not in describe_done(replace(done, val_loss=0.0), 1)
    assert "a uniform guess over its 19,000 characters" in describe_done(replace(done, val_loss=9.5), 19000)


def test_done_line_of_a_model_that_learnt_only_its_training_text_does_not_say_train_longer(tmp_path):
    """A 34-character text: train loss 0.00, validation 12.9 (characters it never saw), and the advice was
    "train it for longer"."""
    done = Done(step=256, val_loss=12.89, best_val_loss=12.89, elapsed=20.0, run_dir=tmp_path, reason="epochs")
    line = describe_done(done, 18, train_loss=0.0001)
    assert "learnt its training text (train loss 0.00)" in line
    assert "uniform guess over its 18 characters (2.89)" in line
    assert "longer" not in line and "give it more" in line
    assert "barely learnt yet" in describe_done(done, 18, train_loss=2.5)  # (no better on its own text either)
    assert "barely learnt yet" in describe_done(done, 18, train_loss=float("nan"))


def test_both_views_tell_the_closing_line_the_last_training_loss(tmp_path):
    import io

    from rich.console import Console

    from tfcli.config import ModelConfig, TrainConfig
    from tfcli.events import Eval, Start
    from tfcli.render.progress import PlainProgress
    events = [Start(tmp_path, 1000, ModelConfig(vocab_size=18), TrainConfig(), "cpu", "float32", 30, 3, 18, 0, False),
              Eval(step=256, val_loss=12.89, train_loss=0.0001, best=True, elapsed=19.0),
              Done(step=256, val_loss=12.89, best_val_loss=12.89, elapsed=20.0, run_dir=tmp_path, reason="epochs")]
    for view in (PlainProgress, LiveProgress):
        console = Console(file=io.StringIO(), width=200, force_terminal=view is LiveProgress, color_system=None)
        with view(console, warnings=console) as shown:
            for e in events:
                shown(e)
        assert "learnt its training text (train loss 0.00)" in console.file.getvalue(), view


def test_eta_follows_the_pace_since_the_first_step_shown():
    eta = Eta()
    assert eta(0.5, 100.0) is None  # a resumed run's first step: half done, but no pace yet
    assert eta(0.6, 110.0) == pytest.approx(40.0)  # 0.1 in 10 s: 0.4 left takes 40 s
    fresh = Eta()
    fresh(0.001, 20.0)  # a first step after 20 s of start-up and compilation
    assert fresh(0.101, 30.0) == pytest.approx(89.9)


@pytest.mark.parametrize("reason, shown", [("interrupted", "29%"), ("time", "100%")])
def test_dashboard_s_last_frame_shows_where_the_run_ended(tmp_path, reason, shown):
    import io

    from rich.console import Console
    screen = io.StringIO()
    with LiveProgress(Console(file=screen, force_terminal=True, width=100)) as view:
        view(Step(step=62, loss=2.0, lr=1e-3, tokens_per_s=1e4, elapsed=14.0, progress=0.29))
        view(Done(step=62, val_loss=None, best_val_loss=None, elapsed=14.2, run_dir=tmp_path, reason=reason))
        last = view.render()
    frame = Console(file=io.StringIO(), width=100, record=True)
    frame.print(last)
    text = frame.export_text()
    assert shown in text and "eta" not in text  # stopped by Ctrl-C at 29%: not "100%, eta 0:00"


@pytest.mark.parametrize("width", [40, 60, 100])
def test_dashboard_figures_break_between_items_never_inside_one(width):
    import io

    from rich.console import Console

    from tfcli.events import Eval
    console = Console(file=io.StringIO(), width=width, color_system=None)
    view = LiveProgress(console)
    view(Step(step=1234, loss=2.5612, lr=6e-3, tokens_per_s=12345.0, elapsed=75.0, progress=0.25))
    view(Eval(step=1200, val_loss=1.6123, train_loss=1.5, best=True, elapsed=70.0))
    console.print(view.render())
    text = " ".join(line.strip("│ ") for line in console.file.getvalue().splitlines())
    for item in ("step 1234", "loss 2.5612", "val 1.6123 (2.326 bpc)", "12.3K tok/s", "lr 6.0e-03"):
        assert item in text, (width, console.file.getvalue())  # (at 40 the loss read '2.56…', its label above it)


def test_the_start_line_counts_one_epoch_in_the_singular():
    from pathlib import Path

    from tfcli.config import ModelConfig, TrainConfig
    from tfcli.events import Start
    from tfcli.render.progress import describe_start

    def line(epochs):
        return describe_start(Start(Path("runs/x"), 1000, ModelConfig(), TrainConfig(epochs=epochs), "cpu",
                                    "float32", 100, 10, 5, 0, False))
    assert "; 1 epoch;" in line(1.0)
    wide = describe_start(Start(Path("runs/x"), 10**8, ModelConfig(n_embd=1024, block_size=2048),
                                TrainConfig(batch_size=4096), "cpu", "float32", 100, 10, 5, 0, False))
    assert "1,024 wide, context 2,048), batch 4,096," in wide  # (as the counts beside them are written)
    assert "2 epochs" in line(2.0) and "0.5 epochs" in line(0.5)


def test_sample_line_shows_control_and_bidi_characters_as_symbols_and_keeps_joiners():
    from tfcli.render.progress import sample_line

    line = sample_line("\x1b[31mERROR\x1b[0m ok\u202e rtl\nnext\tcol 👩\u200d👧\n")
    assert "\x1b" not in line and "\u202e" not in line and "\t" not in line
    assert line.startswith("␛[31mERROR␛[0m ok")
    assert " ⏎ next" in line and "👩\u200d👧" in line and not line.endswith("⏎ ")


def test_a_plain_log_s_validation_line_has_the_recent_train_loss_beside_it():
    import io

    from rich.console import Console

    from tfcli.events import Eval
    from tfcli.render.progress import PlainProgress

    console = Console(file=io.StringIO(), width=120, color_system=None)
    log = PlainProgress(console)
    log(Eval(step=250, val_loss=1.6123, train_loss=1.5012, best=True, elapsed=70.0))
    log(Eval(step=0, val_loss=4.17, train_loss=float("nan"), best=True, elapsed=1.0))  # (a resumed run's first)
    first, second = console.file.getvalue().splitlines()
    assert first == "step    250  val 1.6123 (2.326 bits/char)  train 1.5012  best"  # (the gap: overfitting)
    assert "train" not in second


def test_a_line_said_soon_is_shown_above_the_dashboard_with_the_next_event(tmp_path):
    """Ctrl-C's 'stopping after this step' printed from the signal handler, mid-redraw, was lost."""
    import io

    from rich.console import Console

    screen, said = io.StringIO(), io.StringIO()
    with LiveProgress(Console(file=screen, force_terminal=True, width=100),
                      warnings=Console(file=said, width=100)) as view:
        view(Step(step=1, loss=2.0, lr=1e-3, tokens_per_s=1e4, elapsed=1.0, progress=0.1))
        view.say_soon("stopping after this step (Ctrl-C again quits at once)…")
        assert said.getvalue() == ""  # (not from the handler)
        view(Step(step=2, loss=2.0, lr=1e-3, tokens_per_s=1e4, elapsed=2.0, progress=0.2))
        assert said.getvalue() == "stopping after this step (Ctrl-C again quits at once)…\n"
        view(Done(step=2, val_loss=None, best_val_loss=None, elapsed=2.1, run_dir=tmp_path, reason="interrupted"))
    assert said.getvalue().count("stopping") == 1


def test_the_dashboard_s_eta_never_runs_past_the_time_budget(tmp_path):
    """'24% 0:23 elapsed eta 0:42' of a 1:00 budget: the pace of a slow first minute overshot the budget."""
    import io

    from rich.console import Console

    from tfcli.config import ModelConfig, TrainConfig
    from tfcli.events import Start
    console = Console(file=io.StringIO(), width=100, color_system=None)
    view = LiveProgress(console)
    view(Start(tmp_path, 1000, ModelConfig(), TrainConfig(time_budget=60.0), "cpu", "float32", 100, 10, 5, 0, False))
    view(Step(step=1, loss=3.0, lr=1e-3, tokens_per_s=1e4, elapsed=10.0, progress=0.0))
    view.render()  # (a redraw: the pace counts from the first step shown)
    view(Step(step=9, loss=2.0, lr=1e-3, tokens_per_s=1e4, elapsed=23.0, progress=0.24))  # (pace: 0:41 left)
    console.print(view.render())
    assert "0:23 elapsed eta 0:37" in console.file.getvalue()


def test_the_dashboard_stops_the_terminal_echoing_ctrl_c_and_puts_it_back(monkeypatch):
    """The ^C a terminal echoes at the cursor moved the next redraw down a line: a stray border."""
    import os

    termios = pytest.importorskip("termios")
    from tfcli.render.progress import quiet_control_echo, restore_echo

    leader, follower = os.openpty()
    try:
        with os.fdopen(os.dup(follower)) as tty:
            monkeypatch.setattr("sys.stdin", tty)
            assert termios.tcgetattr(follower)[3] & termios.ECHOCTL  # (a terminal's default)
            echo = quiet_control_echo()
            assert not termios.tcgetattr(follower)[3] & termios.ECHOCTL
            restore_echo(echo)
            assert termios.tcgetattr(follower)[3] & termios.ECHOCTL
        monkeypatch.setattr("sys.stdin", None)  # (stdin closed, or not a terminal: nothing to do)
        assert quiet_control_echo() is None
    finally:
        os.close(leader)
        os.close(follower)


def test_the_start_line_says_several_limits_end_the_run_at_whichever_comes_first():
    from tfcli.config import TrainConfig
    from tfcli.render.progress import describe_limits

    assert describe_limits(TrainConfig(time_budget=300.0)) == "5:00 budget"
    assert describe_limits(TrainConfig(max_steps=600)) == "600 steps"
    assert describe_limits(TrainConfig(epochs=4.0, time_budget=20.0)) == "up to 4 epochs or 0:20"  # (not "4 epochs, ")
    assert describe_limits(TrainConfig(max_steps=1, epochs=2.0, time_budget=60.0)) == "up to 1 step, 2 epochs or 1:00"


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX terminal")
@pytest.mark.parametrize("foreground", [True, False])
def test_a_background_job_leaves_the_terminal_s_settings_alone(monkeypatch, foreground):
    """`tfcli train ... &` on a terminal was stopped (SIGTTOU) as it quietened ^C's echo."""
    import termios

    from tfcli.render.progress import quiet_control_echo, restore_echo

    main, side = os.openpty()
    with os.fdopen(side) as tty, os.fdopen(main):
        monkeypatch.setattr(sys, "stdin", tty)
        monkeypatch.setattr(os, "tcgetpgrp", lambda fd: os.getpgrp() + (0 if foreground else 1))
        before = termios.tcgetattr(side)
        echo = quiet_control_echo()
        assert (echo is not None) == foreground
        assert (termios.tcgetattr(side)[3] & termios.ECHOCTL == 0) == foreground
        restore_echo(echo)
        assert termios.tcgetattr(side) == before
