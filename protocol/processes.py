"""Child processes in a session of their own, stopped as a group.

Flower's SuperLink and SuperNode each start `flower-superexec` (and it app
processes); a child started here leads its own process group, so stopping it
also stops whatever it left behind: SIGTERM to the child (its chance to stop
its own children cleanly), a wait, then SIGKILL to the whole group, and the
child is reaped. Used by the coordinator, the node, the demo, the bench and the
end-to-end tests. Standard library only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def start(args: Sequence[str], log: Path | None = None, *, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start `args` as the leader of a new session; stdout and stderr appended to `log`,
    or piped as text lines when `log` is None. `env` is the whole environment (None: ours)."""
    if log is None:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=cwd, start_new_session=True)
    with open(log, "ab") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid`, if any is left."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM every running child (the last started first), wait up to `timeout` seconds in all,
    then SIGKILL each child's group and reap the child."""
    procs = list(procs)
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        kill_group(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """`stop_all` of one child."""
    stop_all([proc], timeout)
