"""`run_coordinator` with a real SuperLink that dies or fails at the worst moments: one clear error."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from loracommons.coordinator import superlink as superlink_module
from loracommons.coordinator.service import StartOptions, run_coordinator
from loracommons.coordinator.superlink import stale_pid
from tests.e2e.conftest import make_project
from tests.e2e.procs import alive, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def options() -> StartOptions:
    return StartOptions(host="127.0.0.1", port=free_port(), http_host="127.0.0.1", http_port=free_port())


def superlink_pid(project) -> int:  # noqa: ANN001
    return int((project / "flower" / "superlink.pid").read_text())


def test_superlink_killed_while_the_run_is_submitted(tmp_path, tiny_base, monkeypatch):
    project = make_project(tmp_path, tiny_base)
    submit = superlink_module.Link.submit_run

    def killed_first(self, config):  # noqa: ANN001, ANN202
        os.kill(superlink_pid(project), signal.SIGKILL)
        return submit(self, config)

    monkeypatch.setattr(superlink_module.Link, "submit_run", killed_first)
    with pytest.raises(RuntimeError, match=r"the SuperLink exited with code -9; see .*superlink\.log"):
        run_coordinator(project, options())
    assert stale_pid(project / "flower" / "superlink.pid") is None


def test_a_failing_server_app_loop_is_one_error_and_everything_stops(tmp_path, tiny_base, monkeypatch):
    project = make_project(tmp_path, tiny_base)

    def broken(self, run_id, server_app, stop, poll=0.5):  # noqa: ANN001, ANN202
        raise ValueError("no task for you")

    monkeypatch.setattr(superlink_module.Link, "serve_run", broken)
    with pytest.raises(RuntimeError, match="serving the run failed: ValueError: no task for you"):
        run_coordinator(project, options())
    pid = superlink_pid(project)
    assert not alive(pid)


def test_a_stop_before_the_last_round_is_reported_as_interrupted(tmp_path, tiny_base):
    project = make_project(tmp_path, tiny_base)
    stop = threading.Event()
    outcome = run_coordinator(project, options(), stop=stop,
                              on_ready=lambda info: threading.Timer(1.0, stop.set).start())
    assert outcome == "interrupted"
    assert stale_pid(project / "flower" / "superlink.pid") is None
