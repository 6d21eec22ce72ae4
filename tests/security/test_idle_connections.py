"""Issue 15 item 5: idle connections must not starve the coordinator of file descriptors.

The review opened a few hundred half-sent requests to the HTTP API (which runs inside the
coordinator process): uvicorn held each one open forever, the process ran out of descriptors, and
blob writes and publish_release failed with "Too many open files". Here a child process runs the
API as `coordinator start` does, under a file-descriptor limit of 256, and 400 connections each
send half a request head and then nothing (loopback only, bounded count and time). The round
loop's work (blob writes, signed releases) must all succeed meanwhile, the API must hold at most
its share of connections and close the idle ones after the head deadline, and then serve again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.security.community import record_result

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHILD = Path(__file__).with_name("api_under_load.py")
FD_LIMIT, IDLE, HEADER_TIMEOUT_S = 256, 400, 2.0
HALF_HEAD = b"GET /api/project HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _open_idle(port: int) -> list[socket.socket]:
    out = []
    for _ in range(IDLE):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(HALF_HEAD)
        except OSError:  # refused at once: fine, it holds nothing
            pass
        out.append(s)
    return out


def _closed_by_server(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (TimeoutError, BlockingIOError):
        return False


def _get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_round_loop_keeps_publishing_while_idle_connections_sit_on_the_api(tmp_path):
    from loracommons.coordinator.config import init_project
    from loracommons.protocol.lora import DEMO_MODEL_ID

    project = tmp_path / "project"
    init_project(project, DEMO_MODEL_ID, lora={"r": 2, "target_modules": ["q_proj"]})
    child = subprocess.Popen([sys.executable, str(CHILD), str(project), str(FD_LIMIT), str(HEADER_TIMEOUT_S)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    idle: list[socket.socket] = []
    try:
        assert child.stdout is not None and child.stdin is not None
        _, port_text, cap_text = child.stdout.readline().split()
        port, cap = int(port_text), int(cap_text)
        assert cap <= FD_LIMIT // 4
        idle = _open_idle(port)
        time.sleep(0.5)  # let the server accept (and refuse) them all
        held = sum(not _closed_by_server(s) for s in idle)
        child.stdin.write("go\n")
        child.stdin.flush()
        result = json.loads(child.stdout.readline())
        assert result == {"published": 5, "errors": []}
        assert held <= cap
        time.sleep(HEADER_TIMEOUT_S + 1.0)
        left = sum(not _closed_by_server(s) for s in idle)
        assert left == 0, f"{left} half-sent requests still held after the head deadline"
        assert _get(port, "/healthz").startswith(b"HTTP/1.1 200")
        assert (project / "releases" / "v5").is_dir()
        record_result("http_api", "idle_connections", {"idle": IDLE, "fd_limit": FD_LIMIT, "cap": cap,
                                                        "held": held, "published": result["published"],
                                                        "left_after_deadline": left})
    finally:
        for s in idle:
            s.close()
        if child.stdin is not None:
            try:
                child.stdin.write("stop\n")
                child.stdin.flush()
            except OSError:
                pass
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
