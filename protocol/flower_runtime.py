"""Flower's Runtime API driven by our own processes: the non-public parts both sides share.

Why Flower's public API does not suffice: in 1.42 the public API (`flwr.app`,
`flwr.clientapp`, `flwr.serverapp`) defines apps; running them is left to
Flower's own throw-away processes (`flwr-clientapp`, `flwr-serverapp`), which
import whatever code a run's bundle names and answer an HTTP 401 by sending
SIGINT to themselves. A node must run only the installed app, and a
coordinator must stop cleanly, so both take tasks from the Runtime API
themselves, with Flower's non-public HTTP client, interceptors, retry policy
and heartbeat. Every such use lives here or in each side's seam
(`client/flower_runtime.py`, `coordinator/flower_runtime.py`), and
`tests/test_flower_contract.py` pins what they rely on, so that a Flower
upgrade fails there and nowhere else. flwr is imported only when called:
`loracommons.protocol` stays importable without it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loracommons.protocol.flower_app import check_fab

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.supercore.fab import Fab
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.retry import RetryInvoker
    from flwr.supercore.run import Run
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger(__name__)

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
"""The one Runtime API call the SuperExec secret protects."""


def safe_retry_invoker(max_time: float | None = None, stop: threading.Event | None = None) -> RetryInvoker:
    """Retry policy for long-lived clients of Flower's HTTP APIs.

    Flower's default invoker answers HTTP 401 by sending SIGINT to its own
    process, which suits its throw-away app processes but would kill a node
    runner or a coordinator whenever a run is stopped. This one retries
    transport errors and 502/503/504, and raises any other HTTP error.
    With `stop`, it gives up as soon as the event is set, and waits between
    tries on the event rather than sleeping.
    """
    import httpx
    from flwr.common.constant import MAX_RETRY_DELAY
    from flwr.supercore.retry import RetryInvoker, exponential

    transport = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                 httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)

    def give_up(exc: Exception) -> bool:
        if stop is not None and stop.is_set():
            return True
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in {502, 503, 504}
        return any(word in str(exc).lower() for word in ("certificate", "ssl", "tls"))

    def wait(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        else:
            stop.wait(seconds)

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=MAX_RETRY_DELAY),
        recoverable_exceptions=(*transport, httpx.HTTPStatusError),
        max_tries=None, max_time=max_time, should_giveup=give_up,
        wait_function=wait,
    )


def acquirer(address: str, secret: bytes | None, stop: threading.Event, *,
             root_certificates: bytes | None = None, max_time: float | None = None) -> RuntimeHttpClient:
    """A Runtime API client that may acquire tasks, as Flower's SuperExec does (TLS when
    `root_certificates` is given; the SuperExec secret signs AcquireTask when `secret` is)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.protobuf.client import ProtobufClientInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[ProtobufClientInterceptor] = [
        RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD}))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=safe_retry_invoker(max_time=max_time, stop=stop))


@dataclass(frozen=True)
class Acquired:
    """A task handed to us: the token that opens its input, and its run."""

    token: str
    run_id: int


def acquire_task(client: RuntimeHttpClient, app: Literal["client", "server"]) -> Acquired | None:
    """The next ClientApp or ServerApp task waiting, or None."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    kind = TaskType.CLIENT_APP if app == "client" else TaskType.SERVER_APP
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[kind]))
    if not (res.HasField("task") and res.token):
        return None
    return Acquired(res.token, res.task.run_id)


@dataclass(frozen=True)
class AppBundle:
    """The app a task's run names, as `check_fab` compares it with the installed one."""

    run_id: int
    fab_id: str
    fab_version: str
    content: bytes
    sha256: str

    @classmethod
    def of(cls, run: Run, fab: Fab) -> AppBundle:
        return cls(run.run_id, run.fab_id, run.fab_version, fab.content, fab.hash_str)

    def check(self, version: str) -> None:
        """Raise `ForeignApp` unless this is the installed loracommons app at `version`."""
        check_fab(self.content, self.sha256, self.fab_id, self.fab_version, version)


class TaskSession:
    """One task's Runtime API client: a heartbeat while it runs, its output pushed at the end."""

    def __init__(self, client: RuntimeHttpClient):
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http

        self.client = client
        self.context: Context | None = None
        self._heartbeat: HeartbeatSender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        self._heartbeat.start()

    def finish(self, completed: bool, details: str) -> None:
        """Push the task's final status and context (never raises), stop the heartbeat, close."""
        from flwr.common.constant import SubStatus
        from flwr.common.serde import context_to_proto
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest

        try:
            self.client.PushTaskOutput(PushTaskOutputRequest(
                context=context_to_proto(self.context) if self.context else None,
                sub_status=SubStatus.COMPLETED if completed else SubStatus.FAILED, details=details))
        except Exception as exc:  # the SuperLink or SuperNode may be gone: the task ends all the same
            log.debug("PushTaskOutput failed: %s", exc)
        finally:
            try:
                self._heartbeat.stop()
            except RuntimeError as exc:  # its thread already died (a 401 from a restarted SuperNode)
                log.debug("heartbeat stop: %s", exc)
            self.close()

    def close(self) -> None:
        self.client.close()
