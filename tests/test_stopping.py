"""Ctrl-C as a way to stop: the first lets the step finish, the second (or one before any step) quits."""

import os
import signal
import threading

import pytest

from tfcli.stopping import StopFlag, Terminated, default_signals, interrupt_behind


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


def test_the_warning_hushed_for_an_interrupt_is_heard_again_after_the_run():
    import warnings

    before = list(warnings.filters)
    with pytest.raises(KeyboardInterrupt), StopFlag():
        os.kill(os.getpid(), signal.SIGINT)  # (quits at once, hushing torch's anomaly-mode report)
    assert warnings.filters == before  # a notebook's later anomaly reports still show


def test_a_handler_python_cannot_put_back_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(signal, "signal", lambda s, h: calls.append(h))  # (returns None: a handler set in C)
    with StopFlag() as stop:
        pass
    assert calls == [stop.handle, stop.handle]  # installed for SIGINT and SIGTERM; None is not "put back"


def test_a_ctrl_c_that_python_wrapped_in_another_error_is_found_behind_it():
    class Interrupted:  # what a Ctrl-C during an import's `class` statement with a cached_property does
        def __set_name__(self, owner, name):
            raise KeyboardInterrupt
    with pytest.raises(BaseException) as caught:
        type("Defined", (), {"attribute": Interrupted()})  # (Python 3.11: a RuntimeError over it)
    assert isinstance(interrupt_behind(caught.value), KeyboardInterrupt)
    assert interrupt_behind(ValueError("no")) is None
    looped = ValueError("a")
    looped.__context__ = RuntimeError("b")
    looped.__context__.__context__ = looped
    assert interrupt_behind(looped) is None  # (a cycle of contexts ends the walk)


def test_joining_the_others_leaves_signals_their_default_action_and_then_puts_back_ours():
    def ours(signum, frame):
        pass
    before, interrupt = signal.signal(signal.SIGTERM, ours), signal.getsignal(signal.SIGINT)
    try:
        with default_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is ours
        assert signal.getsignal(signal.SIGINT) is interrupt
    finally:
        signal.signal(signal.SIGTERM, before)
