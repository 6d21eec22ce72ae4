"""The coordinator's Flower SuperLink, and the ServerApp run inside our own process.

`flower-superlink --isolation process` serves the Fleet API to volunteers and
starts no app process of its own. The coordinator submits the canonical app
bundle (a `pyproject.toml` naming installed modules), takes that run's ServerApp
task from the SuperLink's Runtime API (authenticated with a secret only this
project folder holds), checks the bundle as nodes do, and calls the installed
ServerApp with a Grid. Runs it did not submit are refused without running.
Flower's non-public API clients this needs are in `coordinator/flower_runtime.py`.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loracommons.coordinator import flower_runtime
from loracommons.protocol import processes
from loracommons.protocol.flower_app import ForeignApp, app_pyproject
from loracommons.protocol.flower_runtime import acquire_task, acquirer

log = logging.getLogger(__name__)


def installed_version() -> str:
    from loracommons import __version__

    return __version__


def fab_bytes() -> bytes:
    """The app bundle: deterministic zip of our `pyproject.toml` (and Flower's content list)."""
    return flower_runtime.build_fab({"pyproject.toml": app_pyproject(installed_version()).encode()})


@dataclass(frozen=True)
class Tls:
    ca: str
    cert: str
    key: str


def wait_port(host: str, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode} (see superlink.log)")
        with socket.socket() as sock:
            if sock.connect_ex((connect_host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"SuperLink did not open port {port} within {timeout:.0f} s")


def stale_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is still a flower-superlink we started."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"flower-superlink" in cmdline and str(pid_file.parent).encode() in cmdline else None


def start_superlink(
    project_dir: Path, host: str, port: int, tls: Tls | None, node_auth: bool
) -> subprocess.Popen:
    """Start the SuperLink in its own process group, after stopping one a crash left behind."""
    state = project_dir / "flower"
    state.mkdir(exist_ok=True)
    pid_file = state / "superlink.pid"
    old = stale_pid(pid_file)
    if old is not None:
        log.warning("stopping SuperLink pid %s left by a previous coordinator", old)
        processes.kill_group(old)
        time.sleep(0.5)
    # A fresh, in-memory database each start: messages of a run a crash left behind would otherwise be
    # offered to SuperNodes again, which Flower 1.42 turns into tasks whose content never arrives (the
    # node's runner then waits on them for hours). Nodes register again by themselves; allowlisted keys
    # are registered again by the coordinator at every start. In memory, each of a round's ~30 requests
    # per volunteer costs the SuperLink 10-30 ms instead of 50-120 ms on a file. Our own state lives in
    # the project's store, not here. Files left by earlier versions are removed.
    for leftover in ("superlink.db", "superlink.db-wal", "superlink.db-shm", "superlink.db-journal"):
        (state / leftover).unlink(missing_ok=True)
    secret_file = state / "superexec.secret"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32))
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", host, "--port", str(port),
           "--isolation", "process", "--superexec-auth-secret-file", str(secret_file),
           "--database", ":flwr-in-memory:", "--disable-runtime-dependency-installation"]
    if tls:
        cmd += ["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    else:
        cmd.append("--insecure")
    if node_auth:
        cmd.append("--enable-supernode-auth")
    proc = processes.start(cmd, state / "superlink.log", env={**os.environ, "FLWR_HOME": str(state / "home")})
    pid_file.write_text(str(proc.pid))
    wait_port(host, port, proc=proc)
    return proc


class Link:
    """Control and Runtime API clients of one SuperLink."""

    def __init__(self, project_dir: Path, address: str, ca: str | None):
        self.address = address
        self.ca_path = ca
        self.ca = Path(ca).read_bytes() if ca else None
        self.secret = (project_dir / "flower" / "superexec.secret").read_bytes()

    def submit_run(self, run_config: dict) -> int:
        return flower_runtime.start_run(self.address, self.ca_path, fab_bytes(), run_config)

    def register_node(self, public_key_openssh: str, name: str = "") -> int:
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_ssh_public_key(public_key_openssh.encode())
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return flower_runtime.register_node(self.address, self.ca_path, pem, name)

    def serve_run(self, run_id: int, server_app: Callable, stop: threading.Event,
                  poll: float = 0.5) -> str:
        """Take ServerApp tasks until run `run_id` has been served or `stop` is set; refuse any other run."""
        client = acquirer(self.address, self.secret, stop, root_certificates=self.ca)
        try:
            while not stop.is_set():
                task = acquire_task(client, "server")
                if task is None:
                    time.sleep(poll)
                    continue
                outcome = self._run_task(task.token, run_id, server_app, stop)
                log.info("ServerApp task of run %s: %s", task.run_id, outcome)
                if task.run_id == run_id:
                    return outcome
            return "stopped"
        finally:
            client.close()

    def _run_task(self, token: str, run_id: int, server_app: Callable, stop: threading.Event) -> str:
        task = flower_runtime.ServerTask(self.address, self.ca, token, stop)
        completed, details = False, "unknown"
        try:
            bundle = task.pull()
            if bundle.run_id != run_id:
                details = f"run {bundle.run_id} was not submitted by this coordinator"
                log.error("refusing %s", details)
                return "refused"
            try:
                bundle.check(installed_version())
            except ForeignApp as exc:
                details = f"refused foreign app: {exc}"
                return "refused"
            grid, context = task.start(bundle)
            server_app(grid=grid, context=context)
            completed, details = True, ""
            return "completed"
        except Exception as exc:
            log.exception("ServerApp failed")
            details = f"ServerApp failed: {exc}"
            return "failed"
        finally:
            task.finish(completed, details)
