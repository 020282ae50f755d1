"""The training log's closing line."""

from dataclasses import replace

from tfcli.render.progress import describe_done
from tfcli.trainer import Done


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
