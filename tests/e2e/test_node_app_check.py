"""A node refuses any run whose app is not the installed loracommons app, and runs none of its code.

Real processes on 127.0.0.1: a stock `flower-superlink` (default subprocess
isolation, so it runs whatever ServerApp a run brings) and two `loracommons join`
nodes. Apps are submitted with `flwr run` as anyone reaching the SuperLink could.
Each app's ServerApp sends one "train" message to every node and writes the
replies to a JSON file; each app's ClientApp would write a marker file, at import
and when called. The SuperLink runs the foreign ServerApp (the report appears),
so the foreign code is live; the nodes must still never run theirs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from loracommons import __version__
from loracommons.protocol.flower_app import app_pyproject
from tests.e2e.conftest import volunteer_data
from tests.e2e.procs import BIN, Processes, alive, descendants, free_port, read_json, started_at, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

INVALID_FAB = 7  # flwr.common.constant.ErrorCode.INVALID_FAB
WAIT_S = 60.0

SERVER_APP = '''\
"""Not loracommons: one train message to every node, the replies to a JSON file."""
import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

REPORT = {report!r}
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + {wait!r}
    nodes = []
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= 2:
            break
        time.sleep(0.5)
    messages = [Message(RecordDict({{"cfg": ConfigRecord({{"do": "write the marker"}})}}), dst_node_id=node,
                        message_type="train") for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())))
    report = {{"nodes": nodes, "replies": []}}
    for reply in replies:
        entry = {{"node": reply.metadata.src_node_id, "error": reply.has_error()}}
        if reply.has_error():
            entry.update(code=reply.error.code, reason=reply.error.reason)
        report["replies"].append(entry)
    with open(REPORT + ".tmp", "w") as fh:
        json.dump(report, fh)
    os.replace(REPORT + ".tmp", REPORT)
    print("foreign ServerApp wrote", REPORT, flush=True)
'''

CLIENT_APP = '''\
"""Not loracommons: leaves a marker wherever it is imported or called."""
import os

MARKER = {marker!r}
with open(MARKER, "a") as fh:
    fh.write(f"imported in pid {{os.getpid()}}\\n")

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    with open(MARKER, "a") as fh:
        fh.write(f"train called in pid {{os.getpid()}}\\n")
    return Message(RecordDict({{"out": ConfigRecord({{"done": True}})}}), reply_to=msg)
'''

FOREIGN_PYPROJECT = app_pyproject("1.0.0", name="foreign-app", publisher="someone",
                                  serverapp="foreignapp.server_app:app",
                                  clientapp="foreignapp.client_app:app", description="Someone else's app")


def kill_all(found: list[tuple[int, int | None]]) -> None:
    """SIGKILL each process we started (pid and start time, as `started_at` read it) that is still
    that process and alive, and wait until it is gone (a pid reused since is left alone)."""
    pids = [pid for pid, start in found if start is not None and started_at(pid) == start]
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wait_for(lambda: not any(alive(pid) and started_at(pid) == start for pid, start in found), 15,
             "leftover processes to go")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write_files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def foreign_app(folder: Path, report: Path, marker: Path) -> Path:
    """Its own package, publisher and name."""
    return write_files(folder / "foreign-app", {
        "pyproject.toml": FOREIGN_PYPROJECT,
        "foreignapp/__init__.py": "",
        "foreignapp/server_app.py": SERVER_APP.format(report=str(report), wait=WAIT_S),
        "foreignapp/client_app.py": CLIENT_APP.format(marker=str(marker)),
    })


def shadow_app(folder: Path, report: Path, marker: Path) -> Path:
    """Our exact pyproject.toml, plus a `loracommons` package that Flower would import first."""
    return write_files(folder / "shadow-app", {
        "pyproject.toml": app_pyproject(__version__),
        "loracommons/__init__.py": "",
        "loracommons/client/__init__.py": "",
        "loracommons/client/client_app.py": CLIENT_APP.format(marker=str(marker)),
        "loracommons/coordinator/__init__.py": "",
        "loracommons/coordinator/server_app.py": SERVER_APP.format(report=str(report), wait=WAIT_S),
    })


class Cluster:
    def __init__(self, root: Path, procs: Processes, port: int):
        self.root, self.procs, self.port = root, procs, port
        self.cli_home = root / "flwr-cli"
        self.cli_home.mkdir()
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
            "insecure = true\n")
        self.superlink = self.nodes = None

    def flwr_run(self, app: Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), "run", str(app), "local", "--stream"], cwd=self.root,
                              env={**os.environ, "FLWR_HOME": str(self.cli_home)}, capture_output=True,
                              text=True, timeout=WAIT_S + 60)

    def node_homes(self) -> list[Path]:
        return [self.root / f"flwr-vol{i}" for i in range(2)]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.procs.log(name)[-3000:]}"
                         for name in ("superlink.log", "vol0.log", "vol1.log"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("appcheck")
    procs = Processes(root)
    port = free_port()
    env = {"FLWR_HOME": str(root / "flwr-superlink"), "XDG_CONFIG_HOME": str(root / "xdg-config"),
           "XDG_DATA_HOME": str(root / "xdg-data"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # it starts `flower-superexec`
    superlink = None
    try:
        superlink = procs.start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                 "--port", str(port), "--disable-runtime-dependency-installation"],
                                "superlink.log", env=env)
        wait_for(lambda: port_open(port), 60, "the SuperLink's port", procs=[superlink])
        os.environ.update({k: v for k, v in env.items() if k.startswith("XDG")})
        nodes = [procs.join(port, data, root / f"id{i}", f"vol{i}")
                 for i, data in enumerate(volunteer_data(root, 2))]
        for i in range(2):  # connected as the nodes' own status files say, before any run reaches them
            wait_for(lambda i=i: (read_json(root / f"vol{i}.json") or {}).get("state") == "connected", 120,
                     f"vol{i} to say connected", procs=nodes)
        got = Cluster(root, procs, port)
        got.superlink, got.nodes = superlink, nodes
        yield got
    finally:
        # Flower starts flower-superexec (and it flwr-serverapp) in sessions of their own
        leftover = [(pid, started_at(pid)) for pid in descendants(superlink.pid)] if superlink else []
        procs.stop_all()
        kill_all(leftover)


@pytest.mark.parametrize("kind", ["foreign", "shadow"])
def test_node_refuses_an_app_that_differs_from_the_installed_one(cluster, kind):
    root = cluster.root / kind
    root.mkdir()
    report, marker = root / "report.json", root / "marker.txt"
    app = (foreign_app if kind == "foreign" else shadow_app)(root, report, marker)
    if kind == "shadow":
        assert (app / "pyproject.toml").read_bytes() == app_pyproject(__version__).encode()

    run = cluster.flwr_run(app)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{cluster.logs()}"
    wait_for(lambda: report.exists(), 30, "the foreign ServerApp's report")
    got = json.loads(report.read_text())

    # the SuperLink ran the foreign ServerApp: its code is live, and both nodes got its message
    assert len(got["nodes"]) == 2, (got, cluster.logs())
    assert sorted(r["node"] for r in got["replies"]) == got["nodes"], (got, cluster.logs())
    for reply in got["replies"]:
        assert reply["error"] and reply["code"] == INVALID_FAB, reply
        assert "differs from the installed loracommons" in reply["reason"], reply
    detail = "did not install" if kind == "shadow" else "this node runs loracommons/loracommons-app"
    assert all(detail in r["reason"] for r in got["replies"]), got

    # each node's log and status file show the refusal (the node writes them just after its reply)
    for i in range(2):
        wait_for(lambda i=i: (read_json(cluster.root / f"vol{i}.json") or {}).get("state") == "refused", 30,
                 f"vol{i}'s status file to say refused")
        status = read_json(cluster.root / f"vol{i}.json")
        assert status and status["state"] == "refused" and detail in status["reason"], status
        assert "refused a run whose app differs from the installed loracommons" in cluster.procs.log(
            f"vol{i}.log")

    # none of the foreign ClientApp's code ran, nor was it unpacked on the nodes
    assert not marker.exists(), marker.read_text()
    for home in cluster.node_homes():
        assert not [p for p in home.rglob("*") if p.suffix == ".py"], list(home.rglob("*"))
    assert all(node.poll() is None for node in cluster.nodes), cluster.logs()
    assert cluster.superlink.poll() is None

    # control: imported the way Flower imports app code (app folder first on sys.path), it leaves the marker
    module = "foreignapp.client_app" if kind == "foreign" else "loracommons.client.client_app"
    subprocess.run([str(BIN / "python"), "-c", f"import sys; sys.path.insert(0, {str(app)!r}); "
                    f"import {module}"], check=True, timeout=120, cwd=root)
    assert marker.read_text().startswith("imported in pid")
