"""The schedule's rules: the learning rate, the step clock, the step that ends a run, when to validate."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tfcli.config import ModelConfig, TrainConfig
from tfcli.schedule import (
    StepClock,
    lr_at,
    schedule_progress,
    step_limit,
    steps_to_repay_compile,
    validation_due,
)


def test_learning_rate_warms_up_holds_then_cools_down_to_the_floor_as_one_minus_sqrt():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, cooldown=0.4, min_lr_ratio=0.05)
    assert lr_at(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_at(0.05, 9, cfg) == 1.0
    assert lr_at(0.6, 60, cfg) == 1.0
    assert lr_at(0.7, 70, cfg) == pytest.approx(0.05 + 0.95 * 0.5)  # a quarter into the cooldown: halfway down
    assert lr_at(0.8, 80, cfg) == pytest.approx(0.05 + 0.95 * (1 - 0.5 ** 0.5))
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.05)


def test_validation_is_due_every_interval_but_not_just_before_the_final_one():
    assert validation_due(30.0, 100.0, 295.0, 30.0)
    assert not validation_due(29.0, 100.0, 295.0, 30.0)
    assert not validation_due(31.0, 282.0, 295.0, 30.0)  # 13 s left: the final validation is near
    assert validation_due(31.0, 279.0, 295.0, 30.0)
    assert validation_due(31.0, 1e6, None, 30.0)  # no time budget: steps end the run


def test_epochs_become_the_steps_whose_batches_read_the_text_that_many_times():
    cfg = TrainConfig(batch_size=4, epochs=2.5)
    assert step_limit(cfg, train_chars=1000, block_size=25) == (25, "epochs")  # 2,500 characters / 100 a step
    assert step_limit(replace(cfg, max_steps=10), 1000, 25) == (10, "steps")  # whichever comes first
    assert step_limit(replace(cfg, max_steps=30), 1000, 25) == (25, "epochs")
    assert step_limit(replace(cfg, epochs=None), 1000, 25) == (None, "steps")  # only the clock ends it
    assert step_limit(replace(cfg, epochs=0.001), 1000, 25) == (1, "epochs")


def test_on_a_gpu_a_default_compile_must_pay_for_itself_before_the_epochs_end_too():
    corpus = SimpleNamespace(train=np.zeros(1000, dtype=np.uint8))  # only its length counts
    model = ModelConfig(block_size=25)
    cfg = TrainConfig(epochs=2.5, batch_size=4, time_budget=300.0)  # 25 steps of 100 characters
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert steps_to_repay_compile(cfg, corpus, model, 0, cuda) == 25
    assert steps_to_repay_compile(cfg, corpus, model, 20, cuda) == 5  # a resumed run: what is left
    assert steps_to_repay_compile(replace(cfg, max_steps=10), corpus, model, 0, cuda) == 10
    assert steps_to_repay_compile(replace(cfg, epochs=None), corpus, model, 0, cuda) is None  # the clock decides
    # a CPU step saves far more: there only --max-steps counts, and a short run of passes still compiles
    assert steps_to_repay_compile(cfg, corpus, model, 0, cpu) is None
    assert steps_to_repay_compile(replace(cfg, max_steps=10), corpus, model, 0, cpu) == 10
    assert steps_to_repay_compile(replace(cfg, max_steps=3000), corpus, model, 2500, cpu) == 500


def test_validation_is_also_due_every_eval_steps_steps():
    assert validation_due(1.0, 10.0, 295.0, 30.0, steps_since=250, every_steps=250)
    assert not validation_due(1.0, 10.0, 295.0, 30.0, steps_since=249, every_steps=250)
    assert not validation_due(1.0, 290.0, 295.0, 30.0, steps_since=900, every_steps=250)  # the final one is near
    assert not validation_due(1.0, 10.0, 295.0, 30.0, steps_since=900, every_steps=None)


def test_a_validation_the_clock_asks_for_waits_for_the_final_one_when_the_step_limit_is_near():
    # a --max-steps 30 run validated at step 29 (30 s had passed), then at 30
    assert not validation_due(31.0, 40.0, None, 30.0, steps_left=1, step_seconds=1.0)
    assert not validation_due(31.0, 40.0, None, 30.0, steps_left=14, step_seconds=1.0)  # 14 s to go: under half
    assert validation_due(31.0, 40.0, None, 30.0, steps_left=16, step_seconds=1.0)
    assert validation_due(31.0, 40.0, None, 30.0, steps_left=1, step_seconds=0.0)  # pace not known yet
    # the step count's own validations are kept: on a GPU the whole run can be shorter than half an interval
    assert validation_due(1.0, 10.0, None, 30.0, steps_since=250, every_steps=250, steps_left=100, step_seconds=0.04)


@pytest.mark.parametrize("warms_up", [False, True])
def test_the_step_clock_leaves_out_a_warm_up_step_and_then_expects_the_least_of_the_last_three(warms_up):
    clock = StepClock(warms_up)
    ends = [0.0, 4.0, 4.1, 4.3, 4.35, 5.0]  # a first step of 4 s (a GPU loading its kernels, or a compile), then fast
    expected = [clock.next_step(t, done) for done, t in enumerate(ends)]
    first = [] if warms_up else [4.0]
    assert expected[:2] == [0.0, 0.0 if warms_up else 4.0]  # (counted, the first step stops a run with < 4 s left)
    assert expected[2:] == pytest.approx([min([*first, 0.1][-3:]), min([*first, 0.1, 0.2][-3:]), 0.05, 0.05])


def test_schedule_progress_follows_whichever_limit_is_further_on_from_where_a_resume_began():
    assert schedule_progress(0.0, 30.0, 300.0, 10, 100) == pytest.approx(0.1)  # both limits 10% in
    assert schedule_progress(0.0, 150.0, 300.0, 10, 100) == pytest.approx(0.5)  # the clock is further on
    assert schedule_progress(0.0, 30.0, None, 50, 100) == pytest.approx(0.5)  # a step limit alone
    assert schedule_progress(0.4, 0.0, 300.0, 0, None) == pytest.approx(0.4)  # a resume starts where it stopped
    assert schedule_progress(0.4, 150.0, 300.0, 0, None) == pytest.approx(0.7)  # and takes what is left to the end
    assert schedule_progress(1.0, 0.0, 60.0, 0, 10) == 1.0  # a finished run resumed for more stays at its floor
    assert schedule_progress(0.0, 900.0, 300.0, 500, 100) == 1.0  # never past the end
