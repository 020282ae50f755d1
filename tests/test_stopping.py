"""Ctrl-C as a way to stop: the first lets the step finish, the second (or one before any step) quits."""

import os
import signal
import threading

import pytest

from tfcli.stopping import StopFlag, Terminated


def test_the_first_signal_after_a_step_raises_the_flag_and_the_second_quits():
    with StopFlag() as stop:
        assert not stop()  # (the trainer's poll after its first step)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (put back)


def test_a_signal_before_the_first_step_ends_quits_at_once_unless_under_torchrun():
    with pytest.raises(KeyboardInterrupt), StopFlag():
        os.kill(os.getpid(), signal.SIGINT)  # (the first step may be a compile: nothing to save yet)
    with pytest.raises(Terminated), StopFlag():
        os.kill(os.getpid(), signal.SIGTERM)
    with StopFlag(alone=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # ranks agree to stop after a step
        assert stop()


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def run():
        with StopFlag() as stop:
            seen.append((stop.previous, stop()))
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [({}, False)]
