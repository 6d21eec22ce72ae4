"""The Flower internals LoRA Commons relies on, pinned: a Flower upgrade that moves one fails here.

The node and the coordinator drive Flower's Runtime and Control APIs themselves
(the reasons are in `protocol/flower_runtime.py`), through three seam modules.
This file checks every non-public name those seams use (that it imports, with
the parameters, fields and values they rely on), and that no other product
module imports anything of flwr beyond its public app API.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("protocol", "client", "coordinator", "loracommons")
# flower_timing reaches the modules whose waits it paces by name; tests/protocol/test_flower_timing.py
# pins what it relies on there.
SEAMS = {"protocol/flower_runtime.py", "protocol/flower_timing.py", "client/flower_runtime.py",
         "coordinator/flower_runtime.py"}
# flwr.simulation: the public (deprecated) run_simulation the rehearsal drives; pinned by
# tests/rehearse/test_simulation_contract.py.
PUBLIC = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation"}


def flwr_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names if alias.name.split(".")[0] == "flwr"}
    return modules


def product_files() -> list[Path]:
    return [path for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))]


def test_only_the_seams_import_flower_internals():
    outside = {str(path.relative_to(ROOT)): sorted(flwr_imports(path) - PUBLIC)
               for path in product_files() if str(path.relative_to(ROOT)) not in SEAMS}
    assert {name: mods for name, mods in outside.items() if mods} == {}


def test_every_internal_module_the_seams_import_exists():
    used = set().union(*(flwr_imports(ROOT / seam) for seam in SEAMS))
    assert used - PUBLIC, "the seams no longer import any internals: drop this contract test"
    for module in sorted(used):
        importlib.import_module(module)


# (module, name, parameters the seams pass by keyword or position)
CALLABLES = [
    ("flwr.supercore.retry", "RetryInvoker",
     {"wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time", "should_giveup",
      "wait_function"}),
    ("flwr.supercore.retry", "exponential", {"max_delay"}),
    ("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address",
     {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"}),
    ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", {"component_name"}),
    ("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor", {"master_secret", "protected_methods"}),
    ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", {"token"}),
    ("flwr.supercore.heartbeat", "HeartbeatSender", {"heartbeat_fn"}),
    ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", {"client"}),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input", {"client"}),
    ("flwr.supernode.runtime.run_clientapp", "push_message", {"client", "message", "context"}),
    ("flwr.superlink.grid", "HttpGrid", {"runtime_api_address", "insecure", "root_certificates", "token"}),
    ("flwr.superlink.grid", "HttpGrid.set_run", {"run"}),
    ("flwr.common.config", "get_fused_config_from_fab", {"fab_file", "run"}),
    ("flwr.cli.build", "build_fab_from_files", {"files"}),
    ("flwr.cli.typing", "SuperLinkConnection", {"name", "address", "root_certificates", "insecure"}),
    ("flwr.cli.utils", "init_http_client_from_connection", {"connection"}),
    ("flwr.supercore.fab", "Fab", {"hash_str", "content", "verifications"}),
    ("flwr.common.serde", "fab_to_proto", set()),
    ("flwr.common.serde", "fab_from_proto", set()),
    ("flwr.common.serde", "user_config_to_proto", set()),
    ("flwr.common.serde", "context_to_proto", set()),
    ("flwr.common.serde", "context_from_proto", set()),
    ("flwr.common.serde", "run_from_proto", set()),
]


@pytest.mark.parametrize(("module", "name", "params"), CALLABLES, ids=[f"{m}.{n}" for m, n, _ in CALLABLES])
def test_callables_take_the_parameters_we_pass(module, name, params):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    assert callable(obj)
    have = set(inspect.signature(obj).parameters)
    assert params <= have, f"{module}.{name} lost {sorted(params - have)}"


def test_runtime_client_methods_and_messages():
    from flwr.proto import control_pb2, runtime_pb2
    from flwr.supercore.runtime import RuntimeHttpClient

    for method in ("AcquireTask", "PullTaskInput", "PushTaskOutput", "SendTaskHeartbeat", "close"):
        assert callable(getattr(RuntimeHttpClient, method)), method
    fields = {
        runtime_pb2.AcquireTaskRequest: {"supported_task_types"},
        runtime_pb2.AcquireTaskResponse: {"task", "token"},
        runtime_pb2.PullTaskInputResponse: {"task_id", "run", "context", "fab"},
        runtime_pb2.PushTaskOutputRequest: {"context", "sub_status", "details"},
        control_pb2.StartRunRequest: {"fab", "override_config", "federation"},
        control_pb2.StartRunResponse: {"run_id"},
        control_pb2.RegisterNodeRequest: {"public_key", "name"},
        control_pb2.RegisterNodeResponse: {"node_id"},
    }
    for message, names in fields.items():
        assert names <= set(message.DESCRIPTOR.fields_by_name), message.DESCRIPTOR.full_name
    task_type = runtime_pb2.AcquireTaskResponse.DESCRIPTOR.fields_by_name["task"].message_type
    assert "run_id" in task_type.fields_by_name
    assert runtime_pb2.PullTaskInputRequest() is not None


def test_constants_and_enum_values():
    from flwr.common.constant import MAX_RETRY_DELAY, ErrorCode, SubStatus
    from flwr.supercore.constant import TaskType

    assert TaskType.CLIENT_APP == "flwr-clientapp" and TaskType.SERVER_APP == "flwr-serverapp"
    assert (SubStatus.COMPLETED, SubStatus.FAILED) == ("completed", "failed")
    # the e2e tests and volunteers' logs read these codes as numbers
    assert (ErrorCode.INVALID_FAB, ErrorCode.CLIENT_APP_RAISED_EXCEPTION) == (7, 2)
    assert MAX_RETRY_DELAY > 0


def test_run_and_fab_fields_the_app_check_reads():
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

    assert {"run_id", "fab_id", "fab_version"} <= set(Run.__dataclass_fields__)
    fab = Fab("00", b"zip", {})
    assert (fab.hash_str, fab.content) == ("00", b"zip")


def test_task_identity_is_settable():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 4, 5
    assert (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id) == (3, 4, 5)


def test_http_grid_takes_our_retry_policy_before_it_connects():
    """`ServerTask` swaps `HttpGrid._retry_invoker` and reads `HttpGrid._runtime_client`."""
    from flwr.superlink.grid import HttpGrid

    from loracommons.protocol.flower_runtime import safe_retry_invoker

    grid = HttpGrid(runtime_api_address="127.0.0.1:9", insecure=True, root_certificates=None, token="t")
    assert hasattr(grid, "_retry_invoker")
    ours = safe_retry_invoker(stop=threading.Event())
    grid._retry_invoker = ours
    try:
        assert grid._runtime_client._retry_invoker is ours  # connecting opens no socket yet
    finally:
        grid.close()


def test_flower_home_rule_matches_ours(monkeypatch, tmp_path):
    """`NodeOptions` resolves the Flower home as Flower does, without importing it."""
    from flwr.supercore.utils import get_flwr_home

    from loracommons.client.node import default_flwr_home

    monkeypatch.setenv("HOME", str(tmp_path))
    for value in (str(tmp_path / "elsewhere"), ""):
        monkeypatch.setenv("FLWR_HOME", value)
        assert default_flwr_home() == get_flwr_home()
    monkeypatch.delenv("FLWR_HOME")
    assert default_flwr_home() == get_flwr_home()


def test_built_app_bundle_holds_our_files():
    import io
    import zipfile

    from loracommons.coordinator.flower_runtime import build_fab
    from loracommons.protocol.flower_app import app_pyproject

    with zipfile.ZipFile(io.BytesIO(build_fab({"pyproject.toml": app_pyproject("1.0").encode()}))) as fab:
        assert set(fab.namelist()) == {"pyproject.toml", ".info/CONTENT"}


def test_protocol_imports_no_flwr_at_import_time():
    """The seam shared by both sides lives in `protocol`, which a downloader installs alone."""
    import subprocess
    import sys

    modules = sorted(f"loracommons.protocol.{path.stem}" for path in (ROOT / "protocol").glob("*.py")
                     if path.stem != "__init__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
