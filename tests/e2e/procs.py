"""Real processes on 127.0.0.1 for end-to-end tests: start, wait, stop by pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from loracommons.client.node import free_port  # noqa: F401  (one helper, re-exported to the tests)
from loracommons.protocol import processes

BIN = Path(sys.executable).parent
LC = [sys.executable, "-m", "loracommons"]


def children(pid: int) -> dict[int, list[str]]:
    """Live processes whose parent is `pid`, with their full argv (read from /proc: `ps` cuts
    long command lines to the terminal width, COLUMNS included)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(") ", 1)[1].split()[:2]
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found[int(stat.parent.name)] = [arg.decode(errors="replace") for arg in argv if arg]
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has finished: only its parent has not collected it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def started_at(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with its pid, who it is (pids are reused)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Pids of every live process below `pid`."""
    found, todo = [], [pid]
    while todo:
        below = list(children(todo.pop()))
        found += below
        todo += below
    return found


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5,
             procs: list[subprocess.Popen] | None = None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs or []:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process {proc.args[:4]} exited with {proc.returncode}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Processes:
    """Starts processes in their own sessions and stops every one of them (and its group)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.pid_files: list[Path] = []  # children our processes started (a SuperLink after kill -9)

    def start(self, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        proc = processes.start(args, self.workdir / log, cwd=self.workdir,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def coordinator(self, project: Path, port: int, http_port: int, log: str = "coordinator.log"):
        self.pid_files.append(project / "flower" / "superlink.pid")
        return self.start([*LC, "coordinator", "start", str(project), "--host", "127.0.0.1",
                           "--port", str(port), "--http-host", "127.0.0.1", "--http-port", str(http_port),
                           "--insecure", "--plain"], log)

    def join(self, port: int, data: Path, identity: Path, name: str, extra: list[str] | None = None):
        home = self.workdir / f"flwr-{name}"
        status = self.workdir / f"{name}.json"
        return self.start([*LC, "join", f"127.0.0.1:{port}", "--data", str(data), "--identity", str(identity),
                           "--insecure", "--threads", "1", "--status-file", str(status), *(extra or [])],
                          f"{name}.log", env={"FLWR_HOME": str(home)})

    def kill9(self, proc: subprocess.Popen) -> None:
        """kill -9 of the process alone, as a crash would (its children survive)."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        processes.stop(proc, timeout)

    def stop_all(self, timeout: float = 30.0) -> None:
        """SIGTERM to every process at once, each then has `timeout` seconds in all to wind down (a
        `join` stops its runner, then its SuperNode: seconds each; one after the other, a community
        of 14 nodes took over a minute to stop), then SIGKILL to each one's group."""
        processes.stop_all(self.procs, timeout)
        from loracommons.coordinator.superlink import stale_pid

        for pid_file in self.pid_files:  # a SuperLink orphaned by a kill -9 of its coordinator
            pid = stale_pid(pid_file)
            if pid is not None:
                processes.kill_group(pid)

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`loracommons ARGS`; with check, a non-zero exit fails the test with the command's own output."""
    result = subprocess.run([*LC, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"loracommons {' '.join(args)} exited {result.returncode}\n"
                             f"--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
                             f"--- stderr (tail) ---\n{result.stderr[-6000:]}")
    return result


def status(project: Path) -> dict:
    """`coordinator status --json`."""
    return json.loads(cli("coordinator", "status", str(project), "--json").stdout)


def release_chain(project: Path) -> list:
    """Every local release, verified as a chain from v1 against the project's release key."""
    from loracommons.coordinator.releases import load_chain
    from loracommons.protocol import PublicKey, verify_chain

    return verify_chain(load_chain(project), PublicKey.load(project / "keys" / "release_key.pub"))
