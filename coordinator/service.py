"""`loracommons coordinator start`: SuperLink, round loop and HTTP API as one command.

    SuperLink (child process, own group)  <- volunteers' SuperNodes (Fleet API)
    ServerApp round loop (thread)          -> the SuperLink's Runtime API, in this process
    HTTP API + dashboard (uvicorn thread)  -> reads the project's state; bounded connections and
                                              request-head time (`ApiLimits`), so idle clients cannot
                                              take the file descriptors the round loop needs
    live status view (main thread)

One coordinator per project folder (an exclusive lock). SIGINT/SIGTERM stop
everything in order; after a kill -9 the next start stops the SuperLink left
behind (by its recorded pid) and resumes from the project's state.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import resource
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


API_MAX_CONNECTIONS = 256
"""Most connections the HTTP API holds at once; more are closed as they arrive."""
API_FD_SHARE = 4
"""The API takes at most 1/API_FD_SHARE of the process's file descriptors: the rest stay with the
round loop (blob writes, releases, the store, the SuperLink's channels)."""
API_HEADER_TIMEOUT_S = 10.0
"""A connection that has not sent a whole request head this long after it opened (or after its
last response) is closed: half-sent requests cannot pile up."""
API_KEEP_ALIVE_S = 5
THREAD_STOP_S = 10.0
"""How long a stopping coordinator waits for its round loop and HTTP threads to end."""


@dataclass(frozen=True)
class ApiLimits:
    max_connections: int
    header_timeout_s: float = API_HEADER_TIMEOUT_S
    keep_alive_s: int = API_KEEP_ALIVE_S

    @classmethod
    def for_this_process(cls) -> ApiLimits:
        """API_MAX_CONNECTIONS, or fewer where the file-descriptor limit is low (after raising it)."""
        soft = raise_fd_limit()
        return cls(max(8, min(API_MAX_CONNECTIONS, soft // API_FD_SHARE)))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a coordinator holds many files and sockets);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a container may refuse; keep what there is
            log.debug("could not raise RLIMIT_NOFILE from %d to %d", soft, hard)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def bounded_protocol(limits: ApiLimits) -> type:
    """uvicorn's h11 protocol with a connection cap and a request-head deadline (uvicorn has neither:
    its keep-alive timer starts only after a first response)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

    class Bounded(H11Protocol):
        _admitted = False
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= limits.max_connections:
                transport.abort()  # frees the descriptor now; the client sees a reset
                return
            self._admitted = True
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            if self._admitted:
                super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            waiting_for = self.cycle  # a new request replaces the cycle
            self._deadline = self.loop.call_later(limits.header_timeout_s, self._expire, waiting_for)

        def _expire(self, waiting_for: RequestResponseCycle | None) -> None:
            idle = waiting_for is None or waiting_for.response_complete  # not a response in progress
            if self.cycle is waiting_for and idle and not self.transport.is_closing():
                self.transport.abort()

    return Bounded


def start_http(app, host: str, port: int, limits: ApiLimits | None = None):  # noqa: ANN001, ANN201
    import uvicorn

    limits = limits or ApiLimits.for_this_process()
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
        http=bounded_protocol(limits), timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=16 * 1024,  # a request head larger than this is refused
    ))
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
    http = http_thread = worker = None
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
        http, http_thread = start_http(create_app(project_dir, store, info), http_host, http_port)
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
        # Let the round loop and the HTTP server see the stop before the store closes under them and
        # before the interpreter exits: a daemon thread still in native code at exit can crash the
        # process (measured: exit -11 instead of 1 after a SuperLink crash)
        for thread in (worker, http_thread):
            if thread is not None:
                thread.join(THREAD_STOP_S)
        store.close()
        server_app.set_event_callback(None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(lock)
