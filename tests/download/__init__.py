"""Tests of `loracommons download` against real HTTP servers on 127.0.0.1.

`serve` runs an ASGI app under uvicorn in a thread on a free loopback port and
stops it on exit. `Hostile` wraps the coordinator's real API and lets a test
replace the answer to chosen paths (tampered bytes, endless bodies, ...).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import uvicorn

from loracommons.coordinator.config import ProjectSection
from loracommons.coordinator.http_api import create_app
from loracommons.coordinator.releases import publish_release
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey

PROJECT = {"id": "dl-project", "name": "Download test", "base_model": "tiny/llama", "mode": "ffa",
           "membership": "open"}
SECTION = ProjectSection(id=PROJECT["id"], name=PROJECT["name"], base_model=PROJECT["base_model"])
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                  "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny/llama"}
WEIGHTS = "adapter_model.safetensors"


def adapter(seed: int, rows: int = 4096) -> dict[str, np.ndarray]:
    """About 130 KB of float32 factors: large enough to stream in several chunks."""
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    return {f"{prefix}.lora_A.weight": rng.standard_normal((4, rows)).astype(np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((rows, 4)).astype(np.float32)}


def make_project(project_dir: Path, n: int, key: SigningKey | None = None) -> tuple[Store, SigningKey]:
    key = key or SigningKey.generate("coordinator")
    store = Store(project_dir)
    for version in range(1, n + 1):
        publish_release(project_dir, store, key, SECTION, version, version, adapter(version), ADAPTER_CONFIG,
                        metrics={"train_loss": 1.0 / version}, update_digests=[f"{version:064x}"],
                        contributors={"ab" * 32: 10})
    return store, key


def project_app(project_dir: Path, store: Store, key: SigningKey):
    return create_app(project_dir, store, info={**PROJECT, "public_key": key.public.openssh})


class Hostile:
    """ASGI app: the real API, except paths a test overrides with its own response."""

    def __init__(self, real):
        self.real = real
        self.overrides: dict[str, Callable] = {}
        self.requests: list[tuple[str, str | None]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.requests.append((scope["path"], headers.get("range")))
            make = self.overrides.get(scope["path"])
            if make is not None:
                response = make(headers)
                await response(scope, receive, send)
                return
        await self.real(scope, receive, send)


@contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` on 127.0.0.1 (free port) in a thread; yields its base URL; always stops it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off", ws="none",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def served_project(folder: Path, n: int = 3) -> Iterator[tuple[str, Path, SigningKey, Hostile]]:
    """A project with `n` releases served by the real API behind `Hostile`: (url, folder, key, hostile)."""
    store, key = make_project(folder, n)
    hostile = Hostile(project_app(folder, store, key))
    try:
        with serve(hostile) as url:
            yield url, folder, key, hostile
    finally:
        store.close()
