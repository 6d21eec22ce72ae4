"""Children started in their own group are stopped with everything they left behind."""

from __future__ import annotations

import os
import time

from loracommons.protocol import processes


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def grandchild(pid_file) -> int:  # noqa: ANN001
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        if text:
            return int(text)
        time.sleep(0.02)
    raise AssertionError("the child never started its own child")


def test_stop_ends_the_child_and_what_it_left_in_its_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    proc = processes.start(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], tmp_path / "log")
    assert os.getpgid(proc.pid) == proc.pid  # a group of its own
    orphan = grandchild(pid_file)
    processes.stop(proc, timeout=5)
    assert proc.returncode is not None
    deadline = time.monotonic() + 5  # SIGKILL of a process we are not the parent of lands soon after
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(orphan)


def test_a_child_ignoring_sigterm_is_killed_after_the_wait(tmp_path):
    proc = processes.start(["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    processes.stop_all([proc], timeout=0.5)
    assert proc.returncode == -9 and time.monotonic() - started < 5


def test_a_child_reaped_elsewhere_still_has_its_leftovers_stopped(tmp_path):
    """A `poll()` that saw the child exit reaped it; what it left in its group is still killed."""
    pid_file = tmp_path / "grandchild.pid"
    proc = processes.start(["sh", "-c", f"sleep 60 & echo $! > {pid_file}"], tmp_path / "log")
    orphan = grandchild(pid_file)
    proc.wait(5)  # reaped here: its pid may now be reused, its group lives on in the orphan
    processes.stop(proc, timeout=5)
    deadline = time.monotonic() + 5
    while alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(orphan)


def test_an_empty_group_of_a_reaped_child_is_not_signalled(tmp_path, monkeypatch):
    """Its number may belong to a newer process group by now: nothing is sent to it."""
    proc = processes.start(["true"], tmp_path / "log")
    proc.wait(5)
    sent: list[int] = []
    monkeypatch.setattr(processes.os, "killpg", lambda pgid, sig: sent.append(pgid))
    monkeypatch.setattr(processes.os, "kill", lambda pid, sig: sent.append(pid))
    processes.stop(proc, timeout=1)
    assert sent == []
