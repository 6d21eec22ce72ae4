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


def test_each_running_node_claims_a_flower_folder_of_its_own(tmp_path):
    """Two nodes under one FLWR_HOME (or one identity) never share runtime.secret (issue 15, item 15)."""
    import os

    from loracommons.client.node import claim_flower_home

    first, fd1 = claim_flower_home(tmp_path / "flwr")
    second, fd2 = claim_flower_home(tmp_path / "flwr")
    assert first == tmp_path / "flwr" and second == tmp_path / "flwr" / "node-2"
    os.close(fd1)  # the first node stops: its folder is free again
    third, fd3 = claim_flower_home(tmp_path / "flwr")
    assert third == first
    os.close(fd2), os.close(fd3)


def test_link_watch_tells_unreachable_from_connected(tmp_path):
    from loracommons.client.node import LinkWatch, free_port

    log = tmp_path / "supernode.log"
    log.write_text("old run: SuperNode ID: 1\n")  # an earlier run's lines are not this run's
    events: list[tuple[str, dict]] = []
    port = free_port()  # nothing listens there
    watch = LinkWatch(f"127.0.0.1:{port}", log, lambda event, details: events.append((event, details)))
    watch.tick()
    assert events == []
    with log.open("a") as fh:
        fh.write("WARNING :   Connection attempt failed, retrying in 1.37 seconds\n")
    watch.tick()
    (event, details), = events
    assert event == "unreachable" and details["in_seconds"] == 1.37
    assert "refused" in details["error"].lower(), details
    with log.open("a") as fh:
        fh.write("WARNING :   Connection attempt failed, retrying in 2.10 seconds\n")
    watch.tick()
    assert len(events) == 1  # said once, not at every attempt
    with log.open("a") as fh:
        fh.write("INFO :      Connection successful after 3.50 seconds and 3 tries.\n")
    watch.tick()
    assert events[-1] == ("connected", {"superlink": f"127.0.0.1:{port}", "again": False})
    with log.open("a") as fh:
        fh.write("WARNING :   Connection attempt failed, retrying in 0.50 seconds\n"
                 "INFO :      Connection successful after 0.60 seconds and 2 tries.\n")
    watch.tick()  # a blip between two looks: nothing to say
    assert len(events) == 2
    with log.open("a") as fh:
        fh.write("WARNING :   Connection attempt failed, retrying in 0.50 seconds\n")
    watch.tick()
    assert events[-1][0] == "unreachable"
    with log.open("a") as fh:
        fh.write("INFO :      Connection successful after 0.60 seconds and 2 tries.\n")
    watch.tick()
    assert events[-1] == ("connected", {"superlink": f"127.0.0.1:{port}", "again": True})


def test_a_runner_refused_by_its_supernode_stops_and_says_why(monkeypatch):
    """A runtime that refuses the runner's secret never hands it a task: the runner says so and stops."""
    import threading

    import httpx

    from loracommons.client import node

    response = httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1:1/x"))
    monkeypatch.setattr(node, "acquirer", lambda *a, **k: object())

    def refuse(client, app):  # noqa: ANN001, ANN202
        raise httpx.HTTPStatusError("401 Unauthorized", request=response.request, response=response)

    monkeypatch.setattr(node, "acquire_task", refuse)
    monkeypatch.setattr(node, "quick_object_pulls", lambda *a: None)
    runner = node.NodeRunner("127.0.0.1:1", b"s" * 32)
    runner.stopping.wait = lambda timeout=None: runner.stopping.is_set()  # type: ignore[method-assign]
    worker = threading.Thread(target=runner.serve)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and runner.fatal and "refuses this node's runtime secret" in runner.fatal
