"""`loracommons coordinator rehearse`: a project's rounds on Flower's Simulation Engine.

The coordinator's own ServerApp (`coordinator/server_app.py`, so `Coordinator.run` and its
rounds, admission, rules and releases) and the volunteers' own ClientApp
(`client/rehearsal.py` around `client/client_app.py`) run on virtual SuperNodes of the
Ray backend. Everything is written to a rehearsal folder, PROJECT/rehearsals/<time>/:
a copy of the project's configuration (with the rehearsal's overrides), a fresh release
key (a rehearsal's releases must never pass for the project's), the coordinator's state
and releases, and one folder per virtual volunteer (its key, its data share, its node
config). The live project's state is only read (its project.toml).

This module lives in `loracommons` (not `coordinator`) because it wires both sides.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import resource
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loracommons.client._data_files import read_rows
from loracommons.client.data import load_records
from loracommons.client.rehearsal import FAULT_KEY, NODE_FILE, volunteer_dir
from loracommons.client.rehearsal_faults import FAULTS
from loracommons.coordinator.config import RELEASE_KEY, ProjectConfig, load_config, write_default_toml
from loracommons.coordinator.events import Event, OnEvent, RoundClosed, RoundOpened
from loracommons.protocol.identity import SigningKey
from loracommons.rehearsal_data import Split, write_shares

REHEARSAL_TIMEOUT_S = 86400.0
"""A rehearsal's round timeout: virtual volunteers take turns on a few workers, so the
project's timeout (meant for volunteers training side by side) would only cut them off."""

class RehearsalError(RuntimeError):
    """A rehearsal cannot run as asked (one line, for the CLI)."""


@dataclass(frozen=True)
class Hostile:
    fraction: float = 0.0
    faults: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> Hostile:
        """`0.2:model_replacement,weight_inflation`: that fraction, the behaviours dealt in turn."""
        if not spec:
            return cls()
        head, _, names = spec.partition(":")
        try:
            fraction = float(head)
        except ValueError:
            fraction = -1.0
        faults = tuple(n for n in names.split(",") if n)
        unknown = [n for n in faults if n not in FAULTS]
        if not 0 < fraction <= 1 or not faults or unknown:
            raise RehearsalError(f"--hostile {spec!r}: expected FRACTION:BEHAVIOUR[,BEHAVIOUR...] with "
                                 f"0 < FRACTION <= 1 and behaviours from {', '.join(FAULTS)}")
        return cls(fraction, faults)

    def assign(self, n: int, seed: int) -> dict[int, str]:
        """Partition id -> behaviour, for round(fraction * n) volunteers chosen by `seed`."""
        count = round(self.fraction * n)
        chosen = sorted(random.Random(seed).sample(range(n), count)) if count else []
        return {p: self.faults[i % len(self.faults)] for i, p in enumerate(chosen)}


@dataclass(frozen=True)
class RehearsalSettings:
    volunteers: int
    data: Path
    split: Split = field(default_factory=lambda: Split("iid"))
    rounds: int = 3
    per_round: int | None = None  # volunteers sampled per round (None: the project's)
    steps: int | None = None  # local steps per round (None: the project's)
    hostile: Hostile = field(default_factory=Hostile)
    threads: int = 1  # torch threads of each virtual volunteer
    cpus: float = 1.0  # Ray CPUs reserved per virtual volunteer
    gpus: float = 0.0  # GPU fraction per virtual volunteer
    device: str = "auto"
    ray_address: str | None = None
    heldout: Path | None = None
    seed: int = 0


def read_data(path: Path) -> list[dict]:
    """Every record of a data file, a `datasets` folder or a folder of data files (checked as `join`
    checks a volunteer's file), with all its fields (a split may group by any of them)."""
    files = [path]
    if path.is_dir() and not (path / "dataset_info.json").exists():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    rows: list[dict] = []
    for file in files:
        load_records(file)  # refuses a malformed file with its line and field
        rows += [raw if isinstance(raw, dict) else {"text": raw} for _, raw in read_rows(file)]
    if not rows:
        raise RehearsalError(f"{path}: no records")
    return rows


def _config_for(project_dir: Path, settings: RehearsalSettings) -> ProjectConfig:
    """The project's configuration with the rehearsal's overrides."""
    cfg = load_config(project_dir)
    n = settings.volunteers
    if cfg.round.min_volunteers > n:
        low = cfg.round.min_volunteers
        raise RehearsalError(f"the project needs at least {low} volunteers a round ([round] min_volunteers); "
                             f"rehearse with --volunteers {low} or more")
    per_round = settings.per_round or cfg.round.volunteers_per_round
    rnd = dataclasses.replace(cfg.round, rounds=settings.rounds, timeout_s=REHEARSAL_TIMEOUT_S,
                              volunteers_per_round=max(per_round, cfg.round.min_volunteers))
    train = cfg.train if settings.steps is None else dataclasses.replace(cfg.train, max_steps=settings.steps)
    return dataclasses.replace(cfg, round=rnd, train=train)


def prepare(project_dir: Path, settings: RehearsalSettings) -> Path:
    """The rehearsal folder: configuration, a fresh release key, the virtual volunteers."""
    if settings.volunteers < 1 or settings.rounds < 1:
        raise RehearsalError("--volunteers and --rounds must be at least 1")
    cfg = _config_for(project_dir, settings)
    shares = settings.split.deal(read_data(settings.data), settings.volunteers, settings.seed)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    folder = (project_dir / "rehearsals" / stamp).resolve()
    folder.mkdir(parents=True)
    write_default_toml(folder / "project.toml", cfg)
    (folder / RELEASE_KEY).parent.mkdir(parents=True, exist_ok=True)
    SigningKey.generate("coordinator").save(folder / RELEASE_KEY)
    faults = settings.hostile.assign(settings.volunteers, settings.seed)
    dirs = [volunteer_dir(folder, p) for p in range(settings.volunteers)]
    write_shares(shares, [d / "data.jsonl" for d in dirs])
    roster: list[dict[str, Any]] = []
    for p, d in enumerate(dirs):
        key = SigningKey.generate("volunteer")
        key.save(d / "key")
        node = {"data-path": str(d / "data.jsonl"), "identity": str(d / "key"),
                "device": settings.device, "threads": str(settings.threads)}
        if p in faults:
            node[FAULT_KEY] = faults[p]
        (d / NODE_FILE).write_text(json.dumps(node, indent=1))
        roster.append({"partition": p, "fingerprint": key.public.fingerprint, "records": len(shares[p]),
                       "behaviour": faults.get(p, "honest"), "public_key": key.public.openssh})
    if cfg.project.membership == "allowlist":
        _register(folder, [r["public_key"] for r in roster])
    (folder / "roster.json").write_text(json.dumps(roster, indent=1))
    return folder


def _register(folder: Path, public_keys: list[str]) -> None:
    from loracommons.coordinator.store import Store

    store = Store(folder)
    try:
        for key in public_keys:
            store.register_volunteer(key)
    finally:
        store.close()


def backend_config(settings: RehearsalSettings) -> dict[str, Any]:
    """Flower's Ray backend settings: resources per virtual volunteer, and the cluster to join."""
    init_args: dict[str, Any] = {"address": settings.ray_address} if settings.ray_address else {}
    if not _verbose():  # a virtual volunteer's failure still reaches the report, as its error reply
        init_args["log_to_driver"] = False
    return {"client_resources": {"num_cpus": settings.cpus, "num_gpus": settings.gpus},
            "init_args": init_args}


class _Clock:
    """Wall-clock and coordinator memory per round, from the coordinator's own events."""

    def __init__(self, forward: OnEvent | None):
        self.forward = forward
        self.rounds: dict[int, dict[str, float]] = {}
        self._opened: dict[int, float] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundOpened):
            self._opened[event.round] = time.monotonic()
        elif isinstance(event, RoundClosed) and event.round in self._opened:
            self.rounds[event.round] = {"seconds": round(time.monotonic() - self._opened[event.round], 3),
                                        "coordinator_rss_mb": round(_rss_mb(), 1)}
        if self.forward:
            self.forward(event)


def _verbose() -> bool:
    return logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _server_app(folder: Path) -> Any:
    """The coordinator's installed ServerApp, told where the rehearsal's project folder is."""
    from flwr.serverapp import ServerApp

    from loracommons.coordinator import server_app

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        context.run_config["project-dir"] = str(folder)
        server_app.main(grid, context)

    return app


def run(folder: Path, settings: RehearsalSettings, on_event: OnEvent | None = None) -> dict:
    """Run the rehearsal prepared in `folder`; its report (also written to FOLDER/report.json)."""
    try:
        import ray
        from flwr.simulation import run_simulation
    except ImportError:
        raise RehearsalError("rehearsals need Flower's Simulation Engine: "
                             "pip install 'loracommons[rehearse]'") from None
    from loracommons.client.rehearsal import rehearsal_app
    from loracommons.coordinator import server_app
    from loracommons.rehearsal_report import build_report

    clock = _Clock(on_event)
    server_app.set_event_callback(clock)
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not _verbose():  # Flower logs every simulation step at DEBUG
        flwr_log.setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        run_simulation(server_app=_server_app(folder), client_app=rehearsal_app(str(folder)),
                       num_supernodes=settings.volunteers, backend_config=backend_config(settings))
    finally:
        server_app.set_event_callback(None)
        flwr_log.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = build_report(folder, settings, clock.rounds, seconds=time.monotonic() - started,
                          coordinator_peak_rss_mb=peak)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    return report


def rehearse(project_dir: Path, settings: RehearsalSettings, on_event: OnEvent | None = None
             ) -> tuple[Path, dict]:
    """Prepare and run a rehearsal of the project in `project_dir`: (its folder, its report)."""
    folder = prepare(project_dir, settings)
    return folder, run(folder, settings, on_event)
