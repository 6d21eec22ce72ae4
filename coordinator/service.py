"""`loracommons coordinator start`: SuperLink, round loop and HTTP API as one command.

    SuperLink (child process, own group)  <- volunteers' SuperNodes (Fleet API)
    ServerApp round loop (thread)          -> the SuperLink's Runtime API, in this process
    HTTP API + dashboard (uvicorn thread)  -> reads the project's state
    live status view (main thread)

One coordinator per project folder (an exclusive lock). SIGINT/SIGTERM stop
everything in order; after a kill -9 the next start stops the SuperLink left
behind (by its recorded pid) and resumes from the project's state.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loracommons.coordinator.config import RELEASE_KEY, load_config
from loracommons.coordinator.events import OnEvent
from loracommons.coordinator.store import Store
from loracommons.coordinator.superlink import Link, Tls, start_superlink
from loracommons.protocol import processes
from loracommons.protocol.identity import SigningKey

log = logging.getLogger(__name__)


class CoordinatorBusy(RuntimeError):
    """Another coordinator process holds this project folder."""


@dataclass(frozen=True)
class StartOptions:
    host: str | None = None
    port: int | None = None
    http_host: str | None = None
    http_port: int | None = None
    tls: Tls | None = None
    """None: insecure (plain HTTP), for local use only."""


def lock_project(project_dir: Path) -> int:
    fd = os.open(project_dir / "coordinator.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        who = holder or "?"
        raise CoordinatorBusy(f"another coordinator (pid {who}) is running on {project_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def start_http(app, host: str, port: int):  # noqa: ANN001, ANN201
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, name="http-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError(f"HTTP API could not listen on {host}:{port}")
    return server, thread


def run_coordinator(
    project_dir: str | Path,
    opts: StartOptions,
    on_event: OnEvent | None = None,
    on_ready: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    tick: Callable[[], None] | None = None,
    serve_after: bool = False,
) -> str:
    """Run until the project's rounds are done or a stop is requested; returns the outcome:
    the ServerApp task's ("completed", "failed", "refused") or "interrupted".

    With `serve_after`, the HTTP API keeps serving releases after the last round
    until a stop is requested.
    """
    from loracommons.coordinator import server_app
    from loracommons.coordinator.http_api import create_app

    project_dir = Path(project_dir).resolve()
    cfg = load_config(project_dir)
    net = cfg.network
    host, port = opts.host or net.host, opts.port or net.fleet_port
    http_host, http_port = opts.http_host or net.http_host, opts.http_port or net.http_port
    lock = lock_project(project_dir)
    stop = stop or threading.Event()  # a fresh one: an earlier run in this process set the last
    server_app.stop_event = stop
    server_app.set_event_callback(on_event)
    store = Store(project_dir)
    key = SigningKey.load(project_dir / RELEASE_KEY)
    superlink: subprocess.Popen | None = None
    http = None
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())

    def superlink_gone() -> RuntimeError | None:
        if superlink is None or superlink.poll() is None:
            return None
        return RuntimeError(f"the SuperLink exited with code {superlink.returncode}; see "
                            f"{project_dir / 'flower' / 'superlink.log'}")

    def failed(what: str, exc: BaseException) -> RuntimeError:
        """One error line for a call to the SuperLink that failed: mostly because it died."""
        try:
            if superlink is not None:
                superlink.wait(2.0)  # a connection reset comes just before the exit status
        except subprocess.TimeoutExpired:
            pass
        return superlink_gone() or RuntimeError(f"{what}: {type(exc).__name__}: {exc}")

    try:
        superlink = start_superlink(project_dir, host, port, opts.tls,
                                    node_auth=cfg.project.membership == "allowlist")
        connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        link = Link(project_dir, f"{connect}:{port}", opts.tls.ca if opts.tls else None)
        if cfg.project.membership == "allowlist":
            for public_key in store.registered_public_keys():
                try:
                    link.register_node(public_key)
                except Exception as exc:  # already registered in the SuperLink's database
                    if gone := superlink_gone():
                        raise gone from None
                    log.debug("register node: %s", exc)
        info = {"fleet_address": f"{host}:{port}", "public_key": key.public.openssh}
        http, _ = start_http(create_app(project_dir, store, info), http_host, http_port)
        try:
            run_id = link.submit_run({"project-dir": str(project_dir)})
        except Exception as exc:  # the SuperLink died under it, or never answered
            raise failed(f"could not submit the run to the SuperLink at {connect}:{port}", exc) from None
        http_connect = "127.0.0.1" if http_host in ("0.0.0.0", "::", "") else http_host
        ready = {"fleet": f"{host}:{port}", "http": f"http://{http_connect}:{http_port}",
                 "run_id": run_id, "fingerprint": key.public.fingerprint, "project": cfg.project.id}
        if on_ready:
            on_ready(ready)
        outcome: list[str] = []
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                outcome.append(link.serve_run(run_id, server_app.app, stop))
            except Exception as exc:  # reported by the main thread, in one line
                log.debug("serving the run failed", exc_info=True)
                failure.append(exc)

        worker = threading.Thread(target=serve, name="server-app", daemon=True)
        worker.start()
        while worker.is_alive():
            if tick:
                tick()
            if (gone := superlink_gone()) and not stop.is_set():
                raise gone
            worker.join(0.5)
        if failure and not stop.is_set():
            raise failed("serving the run failed", failure[0])
        if stop.is_set():  # a signal (or the caller) stopped it before the rounds were done
            return "interrupted"
        if serve_after:
            log.info("rounds finished; the HTTP API stays up until stopped")
            while not stop.wait(0.5):
                if tick:
                    tick()
        return outcome[0] if outcome else "stopped"
    finally:
        stop.set()
        if http is not None:
            http.should_exit = True
        if superlink is not None:
            processes.stop(superlink)
        store.close()
        server_app.set_event_callback(None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock)
