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
    """SIGKILL the process group led by `pid`, if any is left. Only for a pid known to be ours still
    (an unreaped child, or one checked by its command line): a pid's number is reused once its
    process is reaped and its group is empty, and this machine's pid space is small (32768)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM every running child (the last started first), wait up to `timeout` seconds in all,
    then SIGKILL each child's group and reap the child.

    A child is signalled only while it is unreaped (running or a zombie), when its pid cannot belong
    to anyone else; `Popen.terminate` would reap it first. A child something else already reaped
    (a `poll()` that saw it exit) has its group killed only while members of it are left, which
    keeps the group's number from being reused."""
    procs = list(procs)
    for proc in reversed(procs):
        _signal_unreaped(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        _wait_unreaped(proc, deadline)
        if proc.returncode is None or _group_members(proc.pid):
            kill_group(proc.pid)
        proc.wait(timeout)


def _signal_unreaped(proc: subprocess.Popen, sig: int) -> None:
    if proc.returncode is None:  # not reaped: the pid is still this child's
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _wait_unreaped(proc: subprocess.Popen, deadline: float) -> None:
    """Until `proc` exits or `deadline`, without reaping it (its pid stays reserved)."""
    while proc.returncode is None:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere (another thread's wait)
            return
        if info is not None or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def _group_members(pgid: int) -> bool:
    """Whether a live process is in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """`stop_all` of one child."""
    stop_all([proc], timeout)
