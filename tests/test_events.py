"""The events `train` reports, and the renderers that draw them, load without torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["tfcli.events", "tfcli.render.progress", "tfcli.render.heatmap",
                                    "tfcli.render.sample", "tfcli.render.attention_views"])
def test_a_renderer_or_the_events_can_be_imported_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_reports_the_same_event_classes_the_package_exports():
    import tfcli
    from tfcli import events, trainer

    assert tfcli.Done is events.Done is trainer.Done and tfcli.Step is events.Step
