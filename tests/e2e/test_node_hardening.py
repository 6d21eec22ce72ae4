"""A volunteer's node against a wrong address, a relaying coordinator and a second node on the same
machine (issue 15, items 14-16): real `loracommons` processes on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from tests.client import skill_records, write_jsonl
from tests.e2e.conftest import FAST_ROUNDS, make_project, volunteer_data
from tests.e2e.procs import BIN, LC, free_port, read_json, status, wait_for
from tests.e2e.test_join_cli import one_line

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def project_id(project: Path) -> str:
    return tomllib.loads((project / "project.toml").read_text())["project"]["id"]


def join_args(port: int, data: Path, identity: Path, status_file: Path) -> list[str]:
    """`loracommons join` as `Processes.join` runs it, leaving FLWR_HOME to the caller."""
    return [*LC, "join", f"127.0.0.1:{port}", "--data", str(data), "--identity", str(identity),
            "--insecure", "--threads", "1", "--status-file", str(status_file)]


def test_an_unreachable_coordinator_is_said_and_then_the_connection(tmp_path, procs):
    """Item 16: nothing listens at the address: the volunteer reads why and when it retries, not
    "waiting for a round"; once a SuperLink listens there, it reads that it is connected."""
    port = free_port()
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(8))
    node = procs.join(port, data, tmp_path / "id", "vol")
    address = f"127.0.0.1:{port}"
    wait_for(lambda: f"cannot connect to {address}" in one_line(procs.log("vol.log")), 90,
             "the node to say it cannot connect", procs=[node])
    log = one_line(procs.log("vol.log"))
    assert "Connection refused" in log and "retrying by itself (next try in" in log, log
    assert "waiting for a round" not in log, log

    procs.start([str(BIN / "flower-superlink"), "--insecure", "--isolation", "process",
                 "--host", "127.0.0.1", "--port", str(port)], "superlink.log",
                env={"FLWR_HOME": str(tmp_path / "flwr-superlink")})
    wait_for(lambda: f"connected to {address}; waiting for a round" in one_line(procs.log("vol.log")), 120,
             "the node to say it is connected", procs=[node])


def test_a_node_refuses_a_task_relayed_from_another_project(tmp_path, procs, tiny_base):
    """Item 14: a node that worked for project A at an address refuses a task of project B served at
    that address (a coordinator relaying another project's task); nothing is signed for B."""
    one_round = {"rounds": 1, "volunteers_per_round": 1, "min_volunteers": 1, "timeout_s": 60.0}
    alone = {"round": one_round, "aggregation": {"clip": "none"}}  # a median of one update bounds nothing
    project_a = make_project(tmp_path / "a", tiny_base, **alone, **FAST_ROUNDS)
    project_b = make_project(tmp_path / "b", tiny_base, **alone, **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    first = procs.coordinator(project_a, port, http_port, log="coordinator-a.log")
    node = procs.join(port, volunteer_data(tmp_path, 1)[0], tmp_path / "id", "vol")
    wait_for(lambda: first.poll() is not None, 150, "project A's round", procs=[node])
    assert first.returncode == 0, procs.log("coordinator-a.log")
    assert status(project_a)["updates"]["admitted"] == 1
    assert f"joined project {project_id(project_a)} at 127.0.0.1:{port}" in one_line(procs.log("vol.log"))

    second = procs.coordinator(project_b, port, http_port, log="coordinator-b.log")
    refused = f"refused a task of project '{project_id(project_b)}'"
    wait_for(lambda: refused in one_line(procs.log("vol.log")), 150, "the node to refuse B's task",
             procs=[node])
    assert f"joined project '{project_id(project_a)}'" in one_line(procs.log("vol.log"))
    wait_for(lambda: second.poll() is not None, 120, "project B's round to end", procs=[node])
    assert status(project_b)["updates"].get("admitted", 0) == 0
    assert read_json(tmp_path / "vol.json")["rounds_sent"] == 1  # A's round only


def test_two_nodes_under_one_flower_home_both_work(tmp_path, procs, tiny_base):
    """Item 15: two `join`s with one FLWR_HOME (as two joins of one identity share its folder) each take
    a Flower folder of their own, and both contribute to the round."""
    project = make_project(tmp_path, tiny_base, round={"rounds": 1, "volunteers_per_round": 2,
                                                        "min_volunteers": 2, "timeout_s": 120.0},
                           **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    coordinator = procs.coordinator(project, port, http_port)
    shared = {"FLWR_HOME": str(tmp_path / "one-flwr-home")}
    data = volunteer_data(tmp_path, 2)
    nodes = [procs.start(join_args(port, data[i], tmp_path / f"id{i}", tmp_path / f"vol{i}.json"),
                         f"vol{i}.log", env=shared) for i in range(2)]
    wait_for(lambda: coordinator.poll() is not None, 200, "the round", procs=nodes)
    assert coordinator.returncode == 0, procs.log("coordinator.log") + procs.log("vol0.log") + procs.log(
        "vol1.log")
    info = status(project)
    assert info["rounds"]["by_status"]["aggregated"] == 1 and info["updates"]["admitted"] == 2
    logs = one_line(procs.log("vol0.log") + procs.log("vol1.log"))
    assert f"another node runs in {tmp_path / 'one-flwr-home'}" in logs, logs
    assert (tmp_path / "one-flwr-home" / "node-2" / "runtime.secret").exists()

