"""`loracommons join` as a volunteer runs it: bad input, first use, Ctrl-C, a coordinator that restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.client import skill_records, write_jsonl
from tests.e2e.conftest import FAST_ROUNDS, make_project, volunteer_data
from tests.e2e.procs import BIN, LC, alive, children, cli, free_port, read_json, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def join(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([*LC, "join", *args], capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def no_node_started() -> bool:
    home = Path(os.environ["FLWR_HOME"])  # per test (tests/conftest.py)
    return not (home / "supernode.log").exists() and not (home / "runtime.secret").exists()



def supernode_child(join_pid: int) -> int | None:
    return next((pid for pid, argv in children(join_pid).items()
                 if any(arg.endswith("flower-supernode") or arg == "loracommons.client.supernode"
                        for arg in argv)), None)


def connected(home: Path, times: int = 1) -> bool:
    """The SuperNode registered with a SuperLink (`times` times, counting restarts)."""
    log = home / "supernode.log"
    return log.exists() and log.read_text(errors="replace").count("SuperNode ID:") >= times


def one_line(text: str) -> str:
    return " ".join(text.split())


def test_malformed_data_fails_at_once_naming_file_and_line(tmp_path):
    rows = [json.dumps(r) for r in skill_records(4)]
    rows[2] = json.dumps({"instruction": "Reverse.", "input": "abc"})  # no output
    data = tmp_path / "a folder with a rather long name to make the error line long" / "my data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(rows) + "\n")
    identity = tmp_path / "keys" / "id"
    done, seconds = join("127.0.0.1:9", "--data", str(data), "--insecure", "--identity", str(identity))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and f"{data} line 3" in lines[0] and "'output'" in lines[0], lines
    assert "connecting" not in done.stdout and no_node_started() and not identity.exists()
    assert seconds < 60  # no model, no SuperNode: this is import time only

    data.write_text('{"text": "fine"}\n{"text": \n')
    done, _ = join("127.0.0.1:9", "--data", str(data), "--insecure", "--identity", str(identity))
    assert done.returncode != 0 and f"{data} line 2: not valid JSON" in done.stderr
    missing = tmp_path / "nope.jsonl"
    done, _ = join("127.0.0.1:9", "--data", str(missing), "--insecure", "--identity", str(identity))
    assert done.returncode != 0 and f"{missing}: no such file" in done.stderr
    assert no_node_started() and not identity.exists()


def test_insecure_and_root_certificates_are_exclusive(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(4))
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    identity = tmp_path / "id"
    for extra in ([], ["--insecure", "--root-certificates", str(ca)]):
        done, _ = join("127.0.0.1:9", "--data", str(data), "--identity", str(identity), *extra)
        assert done.returncode != 0, done
        assert "--root-certificates" in done.stderr and "--insecure" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done, _ = join("127.0.0.1:9", "--data", str(data), "--identity", str(identity),
                   "--root-certificates", str(tmp_path / "missing.pem"))
    assert done.returncode != 0 and "missing.pem does not exist" in one_line(done.stderr)
    assert no_node_started() and not identity.exists()


def test_first_use_creates_identity_and_ctrl_c_stops_cleanly(tmp_path, procs):
    port = free_port()
    superlink = procs.start([str(BIN / "flower-superlink"), "--insecure", "--isolation", "process",
                             "--host", "127.0.0.1", "--port", str(port)], "superlink.log",
                            env={"FLWR_HOME": str(tmp_path / "flwr-superlink")})
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(8))
    identity = tmp_path / "new" / "id_ecdsa"
    node = procs.join(port, data, identity, "vol")
    wait_for(lambda: connected(tmp_path / "flwr-vol"), 90, "the node to connect", procs=[node, superlink])

    log = one_line(procs.log("vol.log"))
    assert f"created your volunteer identity {identity}" in log, log
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert identity.with_name("id_ecdsa.pub").read_text().startswith("ecdsa-sha2-nistp256 ")
    child = wait_for(lambda: supernode_child(node.pid), 30, "the SuperNode child", procs=[node])

    started = time.monotonic()
    node.send_signal(signal.SIGINT)  # Ctrl-C: the SuperNode runs in a session of its own
    rc = node.wait(30)
    seconds = time.monotonic() - started
    assert rc in (0, 130), procs.log("vol.log")
    assert seconds < 8, seconds  # about 2.5 s: the SuperNode's own graceful stop
    wait_for(lambda: not alive(child), 10, f"SuperNode pid {child} to be gone")
    assert "stopped" in procs.log("vol.log") and "Traceback" not in procs.log("vol.log")
    assert superlink.poll() is None

    # a second start reuses the identity without a word about creating one
    again = procs.join(port, data, identity, "vol2")
    wait_for(lambda: connected(tmp_path / "flwr-vol2"), 90, "the second node to connect", procs=[again])
    assert "created your volunteer identity" not in procs.log("vol2.log")


def test_node_reconnects_after_the_superlink_restarts(tmp_path, procs, tiny_base):
    """The coordinator's SuperLink dies (kill -9) while a node waits; a new coordinator start on the
    same port and database runs a round that needs that node, which reconnected on its own."""
    project = make_project(tmp_path, tiny_base, round={"rounds": 1, "volunteers_per_round": 2,
                                                        "min_volunteers": 2, "timeout_s": 90.0},
                           **FAST_ROUNDS)
    port, http_port = free_port(), free_port()
    first = procs.coordinator(project, port, http_port, log="coordinator1.log")
    data = volunteer_data(tmp_path, 2)
    waiting = procs.join(port, data[0], tmp_path / "id0", "vol0")
    home = tmp_path / "flwr-vol0"
    wait_for(lambda: connected(home), 90, "the first node to connect", procs=[first, waiting])
    wait_for(lambda: " waiting connected=1 " in procs.log("coordinator1.log"), 90,
             "the coordinator to wait for a second node", procs=[first])
    # the coordinator waits for a second volunteer; its SuperLink crashes
    failures = (home / "supernode.log").read_text().count("Connection attempt failed")
    superlink_pid = int((project / "flower" / "superlink.pid").read_text())
    os.kill(superlink_pid, signal.SIGKILL)
    wait_for(lambda: first.poll() is not None, 30, "the coordinator to notice")
    assert first.returncode != 0 and "SuperLink exited" in one_line(procs.log("coordinator1.log"))
    wait_for(lambda: (home / "supernode.log").read_text().count("Connection attempt failed") > failures, 60,
             "the node to notice the SuperLink is gone", procs=[waiting])

    second = procs.coordinator(project, port, http_port, log="coordinator2.log")
    procs.join(port, data[1], tmp_path / "id1", "vol1")
    wait_for(lambda: second.poll() is not None, 150, "the round to finish", procs=[waiting])
    assert second.returncode == 0, procs.log("coordinator2.log") + procs.log("vol0.log")
    info = json.loads(cli("coordinator", "status", str(project), "--json").stdout)
    assert info["rounds"]["by_status"]["aggregated"] == 1
    assert info["updates"]["admitted"] == 2 and info["volunteers"]["contributed"] == 2
    status = read_json(tmp_path / "vol0.json")
    assert status["rounds_sent"] == 1, status
    assert waiting.poll() is None  # the same join process throughout


def test_bad_project_or_caps_fail_at_once(tmp_path):
    """`--project` must be a project id and the caps positive: one error line, no node started."""
    data = write_jsonl(tmp_path / "data.jsonl", skill_records(4))
    base = ["127.0.0.1:9", "--data", str(data), "--insecure", "--identity", str(tmp_path / "id")]
    for extra, words in ((["--project", "[link=x]Bad Id"], "is not a project id"),
                         (["--max-minutes-per-round", "inf"], "--max-minutes-per-round"),
                         (["--max-steps-per-round", "0"], "--max-steps-per-round")):
        done, _ = join(*base, *extra)
        assert done.returncode != 0 and words in one_line(done.stderr), (extra, done.stderr)
        assert "connecting" not in done.stdout
    assert no_node_started()
