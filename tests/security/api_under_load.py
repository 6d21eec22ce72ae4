"""Child process for test_idle_connections.py: a coordinator's HTTP API (started as `coordinator
start` starts it) and a stand-in round loop that writes blobs and publishes releases, under a low
file-descriptor limit.

    python api_under_load.py PROJECT_DIR FD_LIMIT HEADER_TIMEOUT_S

Prints `ready PORT`, waits for a line on stdin (the test has opened its idle connections), then
publishes RELEASES releases and prints one JSON line: {"published": n, "errors": [...]}. Then
waits for a second line and exits.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import socket
import sys
from pathlib import Path

RELEASES = 5


def main() -> None:
    project, fd_limit, header_timeout = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))  # a crowded machine's limit
    from loracommons.coordinator.config import RELEASE_KEY, load_config
    from loracommons.coordinator.http_api import create_app
    from loracommons.coordinator.initial import build_initial_adapter
    from loracommons.coordinator.releases import publish_release
    from loracommons.coordinator.service import ApiLimits, start_http
    from loracommons.coordinator.store import Store
    from loracommons.protocol.identity import SigningKey
    from loracommons.protocol.lora import peft_adapter_config

    cfg, store = load_config(project), Store(project)
    key = SigningKey.load(project / RELEASE_KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limits = dataclasses.replace(ApiLimits.for_this_process(), header_timeout_s=header_timeout)
    server, _ = start_http(create_app(project, store, {}), "127.0.0.1", port, limits)
    print(f"ready {port} {limits.max_connections}", flush=True)
    sys.stdin.readline()
    tensors, errors, published = build_initial_adapter(cfg), [], 0
    lora = peft_adapter_config(cfg.lora, cfg.project.base_model, cfg.project.base_model_revision)
    for version in range(1, RELEASES + 1):
        try:
            store.blobs.put(f"update of round {version}".encode())
            publish_release(project, store, key, cfg.project, version, version, tensors, lora)
            published += 1
        except Exception as exc:  # what the round loop would die of
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
    print(json.dumps({"published": published, "errors": errors}), flush=True)
    sys.stdin.readline()
    server.should_exit = True
    store.close()


if __name__ == "__main__":
    main()
