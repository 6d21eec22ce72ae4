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


def test_reference_training_needs_nothing_the_coordinator_writes(tmp_path):
    """The references start beside the coordinator, before it has stored version 0 (CI saw one read
    `initial_adapter.json` too early): a reference builds version 0 from the project file, and that is
    the very adapter the coordinator stores."""
    import numpy as np

    from loracommons.coordinator.initial import POINTER, decode_adapter, initial_adapter
    from loracommons.coordinator.store import Store
    from loracommons.demo.references import train_reference

    settings = DemoSettings(volunteers=1, n_train=16, n_heldout=2)
    community = Community(tmp_path, settings, Console())
    plan = community.write_data()
    project = community.init_project()
    assert not (project / POINTER).exists()
    scores = train_reference({"project": str(project), "out": str(tmp_path), "skills": plan["skills"],
                              "steps": 1, "data": plan["volunteers"][0]["data"], "seed": 0})
    assert set(scores) == set(plan["skills"])
    assert not (project / POINTER).exists()  # the reference wrote nothing into the coordinator's folder

    from loracommons.coordinator.initial import build_initial_adapter

    store = Store(project)
    try:
        stored = decode_adapter(initial_adapter(project, load_config(project), store))
    finally:
        store.close()
    built = build_initial_adapter(load_config(project))
    assert stored.keys() == built.keys()
    assert all(np.array_equal(stored[k], built[k]) for k in stored)
