"""`NodeOptions`: where a node keeps its Flower files when the caller does not say."""

from __future__ import annotations

from pathlib import Path

import pytest

from loracommons.client.node import NodeOptions


@pytest.mark.parametrize(("flwr_home", "expected"), [
    (None, "home/.flwr"),
    ("", "home/.flwr"),
    ("custom", "custom"),
])
def test_flower_home_defaults_to_flwr_home_else_the_users_home(monkeypatch, tmp_path, flwr_home, expected):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    if flwr_home is None:
        monkeypatch.delenv("FLWR_HOME", raising=False)
    else:
        monkeypatch.setenv("FLWR_HOME", str(tmp_path / flwr_home) if flwr_home else "")
    opts = NodeOptions(superlink="127.0.0.1:9092", node_config={})
    assert opts.flwr_home == tmp_path / expected
    assert opts.flwr_home != Path(".")


def test_an_explicit_flower_home_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "env"))
    assert NodeOptions("127.0.0.1:9092", {}, flwr_home=tmp_path / "mine").flwr_home == tmp_path / "mine"
