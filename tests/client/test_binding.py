"""A node works for the project it joined, and refuses tasks of any other (issue 15, item 14)."""

from __future__ import annotations

import json

import pytest

from loracommons.client.binding import ProjectBinding, WrongProject


def test_first_project_seen_at_an_address_is_remembered_and_others_refused(tmp_path):
    file = tmp_path / "node" / "projects.json"
    binding = ProjectBinding("10.0.0.1:9092", file)
    assert binding.check("alpha") is True  # first seen: remembered
    assert binding.check("alpha") is False
    assert json.loads(file.read_text()) == {"10.0.0.1:9092": "alpha"}
    with pytest.raises(WrongProject, match="'beta'.*joined project 'alpha' at 10.0.0.1:9092") as info:
        ProjectBinding("10.0.0.1:9092", file).check("beta")  # a later process: the file remembers
    assert "\n" not in str(info.value)
    # another address is another coordinator: its own first project
    assert ProjectBinding("10.0.0.2:9092", file).check("beta") is True
    assert json.loads(file.read_text()) == {"10.0.0.1:9092": "alpha", "10.0.0.2:9092": "beta"}


def test_an_explicit_project_wins_and_is_not_remembered(tmp_path):
    file = tmp_path / "projects.json"
    binding = ProjectBinding("h:1", file, project="gamma")
    assert binding.check("gamma") is False
    with pytest.raises(WrongProject, match="'alpha'.*joined project 'gamma' \\(--project\\)"):
        binding.check("alpha")
    assert not file.exists()


def test_from_node_config(tmp_path):
    assert ProjectBinding.from_node_config({"data-path": "x"}) is None  # a node not started by join
    got = ProjectBinding.from_node_config({"superlink": "h:1", "bindings": str(tmp_path / "p.json"),
                                           "project": "p"})
    assert got == ProjectBinding("h:1", tmp_path / "p.json", "p")


def test_a_damaged_bindings_file_is_started_over(tmp_path):
    file = tmp_path / "projects.json"
    file.write_text("{not json")
    assert ProjectBinding("h:1", file).check("alpha") is True
    assert json.loads(file.read_text()) == {"h:1": "alpha"}
