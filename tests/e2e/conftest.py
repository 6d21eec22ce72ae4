"""Shared setup of end-to-end tests: a tiny base model, volunteers' data, a project."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client import build_tiny_model, skill_records, write_jsonl
from tests.e2e.procs import Processes, cli


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture
def procs(tmp_path):
    running = Processes(tmp_path)
    yield running
    running.stop_all()


def volunteer_data(folder: Path, n: int) -> list[Path]:
    """Different data per volunteer (different seeds of the same toy skill)."""
    return [write_jsonl(folder / f"data{i}.jsonl", skill_records(48, seed=i)) for i in range(n)]


def make_project(folder: Path, base: Path, **settings: dict) -> Path:
    """`coordinator init` through the CLI, then round settings written into project.toml."""
    import tomllib

    from loracommons.coordinator.config import ProjectConfig, write_default_toml

    project = folder / "project"
    cli("coordinator", "init", str(project), "--base-model", str(base), "--name", "e2e test")
    obj = tomllib.loads((project / "project.toml").read_text())
    for section, values in settings.items():
        obj.setdefault(section, {}).update(values)
    write_default_toml(project / "project.toml", ProjectConfig.from_dict(obj))
    return project


FAST_ROUNDS = {
    "train": {"max_steps": 8, "batch_size": 8, "seq_len": 64, "learning_rate": 0.01, "warmup_steps": 1},
    "lora": {"r": 4, "alpha": 8.0},
}
