"""The demo's project file carries the demo's aggregation settings (`DemoSettings`)."""

from __future__ import annotations

from rich.console import Console

from loracommons.coordinator.config import load_config
from loracommons.demo.community import Community, DemoSettings


def test_demo_project_takes_the_server_step(tmp_path):
    default = load_config(Community(tmp_path / "a", DemoSettings(), Console()).init_project())
    assert default.aggregation.server_lr == DemoSettings.server_lr
    stepped = load_config(Community(tmp_path / "b", DemoSettings(server_lr=2.5), Console()).init_project())
    assert stepped.aggregation.server_lr == 2.5
    assert stepped.aggregation.clip == "median"  # an open project: the step applies after the clip
