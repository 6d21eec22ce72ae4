"""Shared setup of the security suite: one tiny base model, the honest volunteers, their held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.client import build_tiny_model, skill_records, write_jsonl
from tests.security.community import identity


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny-llama")


@dataclass(frozen=True)
class Honest:
    """Two honest volunteers whose keys and data stay the same in every run: same key, same data
    and same project seed give the same training, so runs compare with the all-honest baseline."""

    data: tuple[Path, Path]
    keys: tuple[Path, Path]
    heldout: list[dict]  # records of the same skill that no volunteer trains on
    folder: Path

    def extra_data(self, name: str, seed: int) -> Path:
        """Data of a non-honest node (its own records of the same skill)."""
        return write_jsonl(self.folder / f"{name}.jsonl", skill_records(48, seed=seed))

    def key(self, name: str) -> Path:
        return identity(self.folder / f"{name}.key")


@pytest.fixture(scope="session")
def honest(tmp_path_factory) -> Honest:
    folder = tmp_path_factory.mktemp("volunteers")
    data = tuple(write_jsonl(folder / f"honest{i}.jsonl", skill_records(48, seed=i)) for i in range(2))
    keys = tuple(identity(folder / f"honest{i}.key") for i in range(2))
    return Honest(data, keys, skill_records(64, seed=1000), folder)  # type: ignore[arg-type]
