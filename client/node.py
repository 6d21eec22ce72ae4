"""A volunteer's node: a Flower SuperNode plus our own runner of the installed ClientApp.

`flower-supernode --isolation process` (started through `client/supernode.py`, which
paces its polls) keeps the connection to the coordinator's SuperLink (and reconnects
by itself) but starts no app process. This module's
`NodeRunner` takes each task from the SuperNode's local Runtime API, checks that
the run's app bundle is exactly the installed loracommons app
(`protocol.flower_app.check_fab`), and only then calls the installed ClientApp
in this process; a foreign app gets an error reply and none of its code runs.
`run_node` supervises both: restarts the SuperNode if it exits, stops it on Ctrl-C.
Flower's non-public runtime pieces this needs are in `client/flower_runtime.py`.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loracommons.client.binding import WrongProject
from loracommons.client.flower_runtime import ClientTask, failure, refusal
from loracommons.protocol import processes
from loracommons.protocol.flower_app import ForeignApp
from loracommons.protocol.flower_runtime import acquire_task, acquirer
from loracommons.protocol.flower_timing import quick_object_pulls
from loracommons.protocol.pacing import Pacer

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
"""Longest wait between two asks for a task; right after a task the runner asks every POLL_FLOOR s."""
POLL_FLOOR = 0.02
AUTH_FAILURES_FATAL = 3
"""Refusals in a row by the local SuperNode's runtime (our secret is not its) before the node gives up."""
UNREACHABLE_REPEAT_S = 60.0
"""How often a node that still cannot connect says so again."""


class NodeError(RuntimeError):
    """The node cannot go on; the message is one line for the volunteer."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def installed_version() -> str:
    from loracommons import __version__

    return __version__


def toml_string(value: str) -> str:
    """A TOML literal string for --node-config (paths with spaces, quotes, backslashes)."""
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class NodeRunner:
    """Runs ClientApp tasks from a local SuperNode's Runtime API, one at a time."""

    def __init__(self, runtime_address: str, secret: bytes | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        self.runtime_address = runtime_address
        self.secret = secret
        self.on_event = on_event or (lambda event, details: None)
        self.stopping = threading.Event()
        self.fatal: str | None = None
        """Why this runner stopped by itself (its SuperNode refuses it), or None."""

    def serve(self) -> None:
        """Poll for tasks until `stopping` is set."""
        quick_object_pulls("flwr.supernode.runtime.run_clientapp")  # pull_task_input's downloads
        client = None
        pace = Pacer(POLL_FLOOR, POLL_SECONDS)  # the SuperNode is local: quick asks are cheap
        refusals = 0
        while not self.stopping.is_set():
            try:
                client = client or acquirer(self.runtime_address, self.secret, self.stopping, max_time=30.0)
                task = acquire_task(client, "client")
                refusals = 0
            except Exception as exc:  # the SuperNode may be restarting
                log.debug("acquire failed: %s", exc)
                client = None
                refusals = refusals + 1 if _refused(exc) else 0
                if refusals >= AUTH_FAILURES_FATAL:  # it will never hand us a task: say so, stop
                    self.fatal = (f"the node's local SuperNode at {self.runtime_address} refuses this "
                                  f"node's runtime secret ({exc}); was its Flower folder taken over?")
                    self.stopping.set()
                    return
                self.stopping.wait(2.0)
                continue
            if task is not None:
                self.run_task(task.token)
                pace.restart()
            else:
                self.stopping.wait(pace.interval())

    def run_task(self, token: str) -> str:
        """Pull one task, check its app, run the installed ClientApp or refuse; push the reply."""
        from loracommons.client.client_app import app as client_app

        task = ClientTask(self.runtime_address, token, self.stopping)
        completed, details, outcome = False, "unknown", "failed"
        try:
            message, context, bundle = task.pull()
            try:
                bundle.check(installed_version())
            except ForeignApp as exc:
                log.error("refusing run %s: %s", bundle.run_id, exc)
                self.on_event("refused", {"run": bundle.run_id, "reason": str(exc)})
                reply = refusal(message, "loracommons node refused the run: its app differs from the "
                                f"installed loracommons ({exc})")
                details, outcome = str(exc), "refused"
            else:
                try:
                    reply = client_app(message=message, context=context)
                    completed, details, outcome = True, "", "completed"
                except WrongProject as exc:  # a task relayed from another project: nothing signed
                    log.info("%s", exc)  # the volunteer reads it once, from on_event
                    self.on_event("refused", {"reason": str(exc)})
                    reply = failure(message, str(exc))
                    details, outcome = str(exc), "refused"
                except Exception as exc:  # every failure goes back as a reason, never a hang
                    log.exception("round failed")
                    details = f"{type(exc).__name__}: {exc}"
                    self.on_event("failed", {"reason": details})
                    reply = failure(message, details)
            task.reply(reply)
            return outcome
        except Exception as exc:
            log.warning("task could not be completed: %s", exc)
            self.on_event("failed", {"reason": f"task lost: {exc}"})
            return "lost"
        finally:
            task.finish(completed, details)


def _refused(exc: Exception) -> bool:
    """An authentication refusal (HTTP 401/403) by the Runtime API, not a passing outage."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) in (401, 403)


def default_flwr_home() -> Path:
    """Where Flower keeps its files: `$FLWR_HOME` when set and non-empty, else `~/.flwr`."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


@dataclass
class NodeOptions:
    superlink: str
    node_config: dict[str, str]
    insecure: bool = False
    root_certificates: str | None = None
    auth_key: str | None = None
    """Identity file for SuperNode authentication (allowlist projects)."""
    flwr_home: Path = field(default_factory=default_flwr_home)
    """The SuperNode's Flower home (its files, our runtime secret and log); see `default_flwr_home`."""
    log_path: Path | None = None


def claim_flower_home(base: Path) -> tuple[Path, int]:
    """A Flower folder of this node's own, locked (flock) for the life of the process: `base` when no
    other running node holds it, else `base/node-2`, `base/node-3`...; two nodes on one machine never
    share a runtime secret or Flower's files. Returns the folder and the lock's descriptor."""
    import fcntl

    for slot in range(1, 65):
        home = base if slot == 1 else base / f"node-{slot}"
        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(home / ".node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return home, fd
    raise NodeError(f"64 nodes already run with Flower folders under {base}")


_RETRY_RE = re.compile(r"Connection attempt failed, retrying in ([0-9.]+) seconds")
_UP_MARKS = ("SuperNode ID:", "Connection successful after")


def probe(superlink: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to `superlink` (HOST:PORT) fails, or None when it connects."""
    host, _, port = superlink.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


class LinkWatch:
    """Tells "connected, no round yet" from "cannot connect", from the SuperNode's log (Flower logs
    its registration, each failed attempt with the wait before the next, and a recovery) and, when
    attempts fail, a TCP probe of the address for the error itself."""

    def __init__(self, superlink: str, log_path: Path, on_event: Callable[[str, dict], None]):
        self.superlink, self.log_path, self.on_event = superlink, log_path, on_event
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.state = "connecting"
        self.said_at = 0.0
        self.ever_connected = False

    def _new_lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                self.offset = 0 if size < self.offset else self.offset
                fh.seek(self.offset)
                text = fh.read(size - self.offset)
        except OSError:
            return []
        end = text.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        return text[:end].decode(errors="replace").splitlines()

    def tick(self) -> None:
        retry_in = None
        for line in self._new_lines():
            if any(mark in line for mark in _UP_MARKS):
                retry_in = None
                if self.state != "connected":
                    self.on_event("connected", {"superlink": self.superlink, "again": self.ever_connected})
                self.state, self.ever_connected = "connected", True
            elif match := _RETRY_RE.search(line):
                retry_in = float(match.group(1))
        if retry_in is None:
            return
        now = time.monotonic()
        if self.state != "unreachable" or now - self.said_at >= UNREACHABLE_REPEAT_S:
            error = probe(self.superlink) or "it accepts TCP connections but the SuperNode's requests fail " \
                "(TLS or protocol mismatch?); see the SuperNode log"
            self.on_event("unreachable", {"superlink": self.superlink, "error": error, "in_seconds": retry_in,
                                          "log": str(self.log_path)})
            self.state, self.said_at = "unreachable", now


def supernode_command(opts: NodeOptions, runtime_port: int, secret_file: Path) -> list[str]:
    node_config = " ".join(f"{key}={toml_string(value)}" for key, value in opts.node_config.items())
    # Flower's SuperNode with its idle polls paced for quick rounds (client/supernode.py)
    cmd = [sys.executable, "-m", "loracommons.client.supernode", "--superlink", opts.superlink,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
           "--superexec-auth-secret-file", str(secret_file), "--node-config", node_config]
    if opts.insecure:
        cmd.append("--insecure")
    elif opts.root_certificates:
        cmd += ["--root-certificates", opts.root_certificates]
    if opts.auth_key:
        cmd += ["--auth-supernode-private-key", opts.auth_key]
    return cmd


def run_node(opts: NodeOptions, on_event: Callable[[str, dict], None] | None = None,
             stop: threading.Event | None = None) -> None:
    """Run SuperNode + runner until `stop` is set, SIGINT or SIGTERM; `NodeError` when the node
    cannot go on (the SuperNode's runtime refuses the runner)."""
    on_event = on_event or (lambda event, details: None)
    home, lock_fd = claim_flower_home(opts.flwr_home)
    if home != opts.flwr_home:
        on_event("flower_home", {"path": str(home), "taken": str(opts.flwr_home)})
    secret_file = home / "runtime.secret"
    secret = os.urandom(32)
    fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    runtime_port = free_port()
    runner = NodeRunner(f"127.0.0.1:{runtime_port}", secret, on_event)
    stop = stop or threading.Event()
    env = {**os.environ, "FLWR_HOME": str(home)}
    log_path = opts.log_path or home / "supernode.log"
    watch = LinkWatch(opts.superlink, log_path, on_event)
    proc: subprocess.Popen | None = None

    def start_supernode() -> subprocess.Popen:
        cmd = supernode_command(opts, runtime_port, secret_file)
        log.info("starting %s", shlex.join(cmd))
        return processes.start(cmd, log_path, env=env)

    def request_stop(signum: int, frame: object) -> None:
        stop.set()
        runner.stopping.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
    worker = threading.Thread(target=runner.serve, name="node-runner", daemon=True)
    try:
        proc = start_supernode()
        on_event("connecting", {"superlink": opts.superlink})
        worker.start()
        restarts, started = 0, time.monotonic()
        while not stop.wait(1.0):
            if runner.fatal:
                raise NodeError(runner.fatal)
            watch.tick()
            if proc.poll() is not None:
                # back off while the SuperNode keeps failing; start over after a healthy spell
                restarts = 1 if time.monotonic() - started > 120 else restarts + 1
                delay = min(30.0, 2.0 * restarts)
                on_event("reconnecting", {"exit_code": proc.returncode, "in_seconds": delay})
                if stop.wait(delay):
                    break
                proc, started = start_supernode(), time.monotonic()
    finally:
        # The runner first, while its SuperNode still answers: an idle runner is gone at once
        # (a round in progress gets a few seconds to push its reply).
        runner.stopping.set()
        if worker.is_alive():
            worker.join(timeout=10)
        if proc is not None:
            processes.stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock_fd)
        on_event("stopped", {})
