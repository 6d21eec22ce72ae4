"""The coordinator's Flower SuperLink, and the ServerApp run inside our own process.

`flower-superlink --isolation process` serves the Fleet API to volunteers and
starts no app process of its own. The coordinator submits the canonical app
bundle (a `pyproject.toml` naming installed modules), takes that run's ServerApp
task from the SuperLink's Runtime API (authenticated with a secret only this
project folder holds), checks the bundle as nodes do, and calls the installed
ServerApp with a Grid. Runs it did not submit are refused without running.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loracommons.protocol.flower_app import ForeignApp, app_pyproject, check_fab, safe_retry_invoker

log = logging.getLogger(__name__)


def installed_version() -> str:
    from loracommons import __version__

    return __version__


def fab_bytes() -> bytes:
    """The app bundle: deterministic zip of our `pyproject.toml` (and Flower's content list)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files({"pyproject.toml": app_pyproject(installed_version()).encode()})[0]


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
        try:
            os.killpg(old, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.5)
    # A fresh database each start: messages of a run a crash left behind would otherwise be offered
    # to SuperNodes again, which Flower 1.42 turns into tasks whose content never arrives (the node's
    # runner then waits on them for hours). Nodes register again by themselves; allowlisted keys are
    # registered again by the coordinator at every start.
    for leftover in ("superlink.db", "superlink.db-wal", "superlink.db-shm", "superlink.db-journal"):
        (state / leftover).unlink(missing_ok=True)
    secret_file = state / "superexec.secret"
    if not secret_file.exists():
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32))
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", host, "--port", str(port),
           "--isolation", "process", "--superexec-auth-secret-file", str(secret_file),
           "--database", str(state / "superlink.db"), "--disable-runtime-dependency-installation"]
    if tls:
        cmd += ["--ssl-ca-certfile", tls.ca, "--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key]
    else:
        cmd.append("--insecure")
    if node_auth:
        cmd.append("--enable-supernode-auth")
    env = {**os.environ, "FLWR_HOME": str(state / "home")}
    logfile = open(state / "superlink.log", "ab")  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    logfile.close()
    pid_file.write_text(str(proc.pid))
    wait_port(host, port, proc=proc)
    return proc


def stop_superlink(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout)


class Link:
    """Control and Runtime API clients of one SuperLink."""

    def __init__(self, project_dir: Path, address: str, ca: str | None):
        self.address = address
        self.ca_path = ca
        self.ca = Path(ca).read_bytes() if ca else None
        self.secret = (project_dir / "flower" / "superexec.secret").read_bytes()

    def control(self):  # noqa: ANN201
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        conn = SuperLinkConnection(name="coordinator", address=self.address,
                                   root_certificates=self.ca_path, insecure=self.ca is None)
        return init_http_client_from_connection(conn)

    def submit_run(self, run_config: dict) -> int:
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        data = fab_bytes()
        request = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(data).hexdigest(), data, {})),
                                  override_config=user_config_to_proto(run_config), federation="")
        client = self.control()
        try:
            return client.StartRun(request).run_id
        finally:
            client.close()

    def register_node(self, public_key_openssh: str, name: str = "") -> int:
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import RegisterNodeRequest

        key = serialization.load_ssh_public_key(public_key_openssh.encode())
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        client = self.control()
        try:
            return client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name)).node_id
        finally:
            client.close()

    def serve_run(self, run_id: int, server_app: Callable, stop: threading.Event,
                  poll: float = 0.5) -> str:
        """Take ServerApp tasks until run `run_id` has been served or `stop` is set; refuse any other run."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                         protected_methods={"/flwr.proto.Runtime/AcquireTask"}),
        ]
        acquirer = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.ca is None, root_certificates=self.ca,
            interceptors=interceptors, retry_invoker=safe_retry_invoker(stop=stop))
        try:
            while not stop.is_set():
                res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
                if not (res.HasField("task") and res.token):
                    time.sleep(poll)
                    continue
                outcome = self._run_task(res.token, run_id, server_app, stop)
                log.info("ServerApp task of run %s: %s", res.task.run_id, outcome)
                if res.task.run_id == run_id:
                    return outcome
            return "stopped"
        finally:
            acquirer.close()

    def _run_task(self, token: str, run_id: int, server_app: Callable, stop: threading.Event) -> str:
        import httpx
        from flwr.app import RecordDict
        from flwr.common.config import get_fused_config_from_fab
        from flwr.common.constant import SubStatus
        from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.superlink.grid import HttpGrid

        grid = HttpGrid(runtime_api_address=self.address, insecure=self.ca is None,
                        root_certificates=self.ca, token=token)
        # No SIGINT on 401 (a stopped run); and once `stop` is set, no retry: Flower pushes and pulls
        # message objects in a thread pool whose workers the interpreter joins at exit, so a worker
        # retrying forever against a dead SuperLink would keep the coordinator from ever exiting.
        grid._retry_invoker = safe_retry_invoker(stop=stop)
        runtime = grid._runtime_client
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
        heartbeat.start()
        context, sub_status, details = None, SubStatus.FAILED, "unknown"
        try:
            res = runtime.PullTaskInput(PullTaskInputRequest())
            TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
            TaskIdentity.node_id = res.context.node_id
            context, run = context_from_proto(res.context), run_from_proto(res.run)
            fab = fab_from_proto(res.fab)
            if run.run_id != run_id:
                details = f"run {run.run_id} was not submitted by this coordinator"
                log.error("refusing %s", details)
                return "refused"
            try:
                check_fab(fab.content, fab.hash_str, run.fab_id, run.fab_version, installed_version())
            except ForeignApp as exc:
                details = f"refused foreign app: {exc}"
                return "refused"
            grid.set_run(run)
            context.run_config = get_fused_config_from_fab(fab.content, run)
            server_app(grid=grid, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
            return "completed"
        except Exception as exc:
            log.exception("ServerApp failed")
            details = f"ServerApp failed: {exc}"
            return "failed"
        finally:
            if context is not None:
                context.state = RecordDict()
            try:
                runtime.PushTaskOutput(PushTaskOutputRequest(
                    context=context_to_proto(context) if context else None,
                    sub_status=sub_status, details=details))
            except httpx.HTTPError as exc:
                log.debug("PushTaskOutput failed: %s", exc)
            finally:
                heartbeat.stop()
                grid.close()
