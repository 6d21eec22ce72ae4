"""The coordinator's seam to Flower's non-public Control API and ServerApp runtime.

Why Flower's public API does not suffice: `flwr.serverapp.ServerApp` and `Grid`
are public, but submitting a run is done by the `flwr` CLI (a command, not a
library), and running a ServerApp task is done by `flwr-serverapp`, which
installs and imports the run's bundle and answers HTTP 401 with SIGINT. The
coordinator submits its own bundle, takes the task itself, checks the bundle
as nodes do, and calls the installed ServerApp with Flower's `HttpGrid`, whose
retry policy it replaces so that a stop is never retried forever. This module
holds every non-public piece of that (the parts shared with the node are in
`protocol/flower_runtime.py`); `tests/test_flower_contract.py` pins them.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING

from loracommons.protocol.flower_runtime import AppBundle, TaskSession, safe_retry_invoker

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.run import Run
    from flwr.superlink.grid import HttpGrid


def build_fab(files: dict[str, bytes]) -> bytes:
    """A FAB (Flower's app bundle) of `files`, zipped as `flwr run` would."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(files)[0]


def _control(address: str, ca_path: str | None) -> ControlHttpClient:
    from flwr.cli.typing import SuperLinkConnection
    from flwr.cli.utils import init_http_client_from_connection

    conn = SuperLinkConnection(name="coordinator", address=address, root_certificates=ca_path,
                               insecure=ca_path is None)
    return init_http_client_from_connection(conn)


def start_run(address: str, ca_path: str | None, fab: bytes, run_config: dict) -> int:
    """Submit a run of app bundle `fab` with run-config overrides; its run id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    request = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                              override_config=user_config_to_proto(run_config), federation="")
    client = _control(address, ca_path)
    try:
        return int(client.StartRun(request).run_id)
    finally:
        client.close()


def register_node(address: str, ca_path: str | None, public_key_pem: bytes, name: str = "") -> int:
    """Allow a SuperNode's public key (PEM); its node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    client = _control(address, ca_path)
    try:
        return int(client.RegisterNode(RegisterNodeRequest(public_key=public_key_pem, name=name)).node_id)
    finally:
        client.close()


class ServerTask(TaskSession):
    """One ServerApp task on the SuperLink's Runtime API, opened with its token, with its Grid."""

    def __init__(self, address: str, root_certificates: bytes | None, token: str, stop: threading.Event):
        from flwr.superlink.grid import HttpGrid

        self.grid: HttpGrid = HttpGrid(runtime_api_address=address, insecure=root_certificates is None,
                                       root_certificates=root_certificates, token=token)
        # Flower pushes and pulls message objects in a thread pool whose workers the interpreter
        # joins at exit: a worker retrying forever against a dead SuperLink would keep the
        # coordinator from ever exiting, and Flower's own policy sends SIGINT on a 401.
        self.grid._retry_invoker = safe_retry_invoker(stop=stop)
        self._run: Run | None = None
        super().__init__(self.grid._runtime_client)

    def pull(self) -> AppBundle:
        """The task's input: its context (kept) and its run's app bundle."""
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest
        from flwr.supercore.task_identity import TaskIdentity

        res = self.client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        self.context, self._run = context_from_proto(res.context), run_from_proto(res.run)
        return AppBundle.of(self._run, fab_from_proto(res.fab))

    def start(self, bundle: AppBundle) -> tuple[HttpGrid, Context]:
        """The Grid and context to call the ServerApp with, once `bundle` has been checked."""
        from flwr.common.config import get_fused_config_from_fab

        assert self._run is not None and self.context is not None, "start before pull"
        self.grid.set_run(self._run)
        self.context.run_config = get_fused_config_from_fab(bundle.content, self._run)
        return self.grid, self.context

    def finish(self, completed: bool, details: str) -> None:
        from flwr.app import RecordDict

        if self.context is not None:  # the coordinator keeps its state in the project folder, not here
            self.context.state = RecordDict()
        super().finish(completed, details)

    def close(self) -> None:
        self.grid.close()
