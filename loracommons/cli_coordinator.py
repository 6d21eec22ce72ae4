"""`loracommons coordinator ...`: run a community project's coordinator."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from loracommons.cli_common import fail

if TYPE_CHECKING:
    from loracommons.coordinator.events import Event
    from loracommons.coordinator.rows import StoreStatus

console = Console()
app = typer.Typer(help="Run the coordinator of a community project.", no_args_is_help=True)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="Project folder to create."),
    base_model: str = typer.Option(..., "--base-model", help="Hugging Face id or local folder."),
    name: str = typer.Option(None, "--name", help="Display name of the project."),
    mode: str = typer.Option("ffa", "--mode", help="Aggregation: ffa | exact | fedavg."),
    membership: str = typer.Option("open", "--membership", help="open | allowlist."),
    revision: str = typer.Option(None, "--revision", help="Base model revision (default: main)."),
) -> None:
    """Write DIR/project.toml (every key documented) and the coordinator's release key."""
    from loracommons.coordinator.config import RELEASE_KEY, ConfigError, init_project
    from loracommons.coordinator.rules import protections
    from loracommons.protocol.identity import SigningKey

    try:
        cfg = init_project(directory, base_model, name=name, mode=mode, membership=membership,
                           revision=revision)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    key = SigningKey.load(directory / RELEASE_KEY)
    console.print(f"project [bold]{escape(cfg.project.id)}[/] created in {escape(str(directory))}",
                  highlight=False)
    config_path = directory / "project.toml"
    console.print(f"  config:      {config_path} (edit before the first start)", highlight=False)
    console.print(f"  release key: {directory / RELEASE_KEY} (keep it secret; back it up)", highlight=False)
    console.print(f"  fingerprint: {key.public.fingerprint}", highlight=False)
    console.print("  downloaders pin this fingerprint: loracommons download URL --pin <fingerprint>",
                  highlight=False)
    head = "protective defaults of an open project" if membership == "open" else "protections"
    console.print(f"  {head} (what one volunteer's update can do; edit in \\[aggregation]):",
                  highlight=False)
    for line in protections(cfg):
        style = "bold red" if line.startswith("unprotected") else ""
        console.print(f"    - {escape(line)}", style=style, highlight=False)


def _status_table(status: StoreStatus, ready: dict, events: list[str]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rounds, updates, latest = status.rounds, status.updates, status.latest_release
    table.add_row("volunteers", f"fleet {ready.get('fleet', '?')}")
    table.add_row("dashboard", ready.get("http", "?"))
    current = f"round {rounds.open} open" if rounds.open else "between rounds"
    table.add_row("rounds", f"{rounds.by_status.get('aggregated', 0)} aggregated, "
                  f"{rounds.by_status.get('skipped', 0)} skipped; {current}")
    reasons = ", ".join(f"{k}: {v}" for k, v in updates.rejected_by_reason.items()) or "none"
    table.add_row("updates", Text(f"{updates.admitted} admitted, {updates.rejected} rejected ({reasons})"))
    release = f"v{latest.version} (round {latest.round})" if latest else "none yet"
    table.add_row("latest release", release)
    for line in events[-6:]:  # event details carry volunteers' and peers' text: never markup
        table.add_row("", Text(line))
    return table


@app.command("start")
def start(
    directory: Path = typer.Argument(..., help="Project folder (from `coordinator init`)."),
    host: str = typer.Option(None, "--host", help="SuperLink address (default: [network] host)."),
    port: int = typer.Option(None, "--port", help="SuperLink port volunteers connect to."),
    http_host: str = typer.Option(None, "--http-host", help="HTTP API address."),
    http_port: int = typer.Option(None, "--http-port", help="HTTP API and dashboard port."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS: for a local test only."),
    ssl_ca_certfile: Path = typer.Option(None, "--ssl-ca-certfile", help="CA certificate (PEM)."),
    ssl_certfile: Path = typer.Option(None, "--ssl-certfile", help="Server certificate (PEM)."),
    ssl_keyfile: Path = typer.Option(None, "--ssl-keyfile", help="Server private key (PEM)."),
    plain: bool = typer.Option(False, "--plain", help="Log lines instead of the live view."),
    serve_after: bool = typer.Option(False, "--serve-after", help="Keep the HTTP API up after the "
                                     "last round, until Ctrl-C."),
) -> None:
    """Start the SuperLink, the round loop and the HTTP API; resume where the project left off."""
    from loracommons.coordinator.config import ConfigError
    from loracommons.coordinator.service import CoordinatorBusy, StartOptions, run_coordinator
    from loracommons.coordinator.superlink import Tls

    tls_files = (ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if insecure == any(tls_files):
        raise fail("give either --insecure (local tests) or all of --ssl-ca-certfile, --ssl-certfile, "
                   "--ssl-keyfile")
    if not insecure and not all(tls_files):
        raise fail("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile together")
    if not insecure:
        for path in tls_files:
            if not path.exists():
                raise fail(f"{path} does not exist")
    tls = None if insecure else Tls(*(str(p.resolve()) for p in tls_files))
    opts = StartOptions(host=host, port=port, http_host=http_host, http_port=http_port, tls=tls)
    events: list[str] = []
    ready: dict = {}
    live_view = not plain and console.is_terminal

    def on_event(event: Event) -> None:
        line = f"{time.strftime('%H:%M:%S')} {event.line()}"
        events.append(line)
        if not live_view:
            print(line, flush=True)

    def on_ready(info: dict) -> None:
        ready.update(info)
        mode = "INSECURE (plain HTTP, local use only)" if insecure else "TLS"
        print(f"coordinator ready: fleet {info['fleet']} ({mode}), dashboard {info['http']}, "
              f"release key {info['fingerprint']}", flush=True)

    live = Live(console=console, refresh_per_second=2, transient=False) if live_view else None
    store_holder: list = []

    def tick() -> None:
        if live is None:
            return
        from loracommons.coordinator.store import Store

        if not store_holder:
            store_holder.append(Store(directory))
        live.update(_status_table(store_holder[0].status(), ready, events))

    try:
        if live is not None:
            live.start()
        outcome = run_coordinator(directory, opts, on_event=on_event, on_ready=on_ready, tick=tick,
                                  serve_after=serve_after)
    except (ConfigError, CoordinatorBusy, RuntimeError, TimeoutError, OSError) as exc:
        raise fail(str(exc)) from None
    finally:
        if live is not None:
            live.stop()
        for store in store_holder:
            store.close()
    if outcome in ("failed", "refused"):  # the round loop did not run to its end: say so in the exit code
        raise fail(f"coordinator stopped: the round loop {outcome} (see the log above)")
    if outcome == "interrupted":
        console.print("coordinator stopped before its last round; `loracommons coordinator start "
                      f"{directory}` resumes where it left off", highlight=False)
        return
    console.print(escape(f"coordinator stopped: {outcome}"), highlight=False)


@app.command("register")
def register(
    directory: Path = typer.Argument(..., help="Project folder."),
    pubkey_file: Path = typer.Argument(..., help="The volunteer's public key (.pub)."),
    name: str = typer.Option(None, "--name", help="Display name for the leaderboard."),
) -> None:
    """Allow a volunteer's key (allowlist projects); takes effect at the next round."""
    from loracommons.coordinator.store import Store
    from loracommons.protocol import ProtocolError, PublicKey

    try:
        public = PublicKey.load(pubkey_file)
    except (ProtocolError, OSError) as exc:
        raise fail(f"{pubkey_file}: {exc}") from None
    store = _store(directory, Store)
    try:
        store.register_volunteer(public, name)
    finally:
        store.close()
    registered = f"registered {public.short} ({public.fingerprint})" + (f" as {name!r}" if name else "")
    console.print(escape(registered), highlight=False)
    console.print("restart the coordinator for SuperNode authentication to admit the new key",
                  highlight=False)


@app.command("ban")
def ban(
    directory: Path = typer.Argument(..., help="Project folder."),
    fingerprint: str = typer.Argument(..., help="Fingerprint or a unique prefix of it."),
) -> None:
    """Refuse every further update signed by this key."""
    from loracommons.coordinator.store import Store, StoreError

    store = _store(directory, Store)
    try:
        full = store.ban(fingerprint)
    except StoreError as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()
    console.print(f"banned {full}", highlight=False)


@app.command("status")
def status(
    directory: Path = typer.Argument(..., help="Project folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Rounds, volunteers, admitted/rejected updates with reasons, latest release."""
    from loracommons.coordinator.store import Store

    store = _store(directory, Store)
    try:
        info = store.status()
    finally:
        store.close()
    if as_json:
        print(json.dumps(info.to_json(), indent=2, default=str))
        return
    console.print(_status_table(info, {"fleet": "(see project.toml)", "http": "(see project.toml)"}, []))


def _store(directory: Path, store_cls):  # noqa: ANN001, ANN202
    if not (directory / "project.toml").exists():
        raise fail(f"{directory} is not a project folder (no project.toml); see `coordinator init`")
    return store_cls(directory)


@app.command("rehearse")
def rehearse(
    directory: Path = typer.Argument(..., help="Project folder (only its project.toml is read)."),
    volunteers: int = typer.Option(..., "--volunteers", help="Virtual volunteers."),
    data: Path = typer.Option(..., "--data", help="Data file, datasets folder or folder of data files."),
    split: str = typer.Option("iid", "--split", help="iid | by-field:NAME | dirichlet:ALPHA[:NAME]."),
    rounds: int = typer.Option(3, "--rounds", help="Rounds to run."),
    per_round: int = typer.Option(None, "--per-round", help="Volunteers per round (default: project's)."),
    steps: int = typer.Option(None, "--steps", help="Local steps per round (default: project's)."),
    hostile: str = typer.Option(None, "--hostile", help="FRACTION:BEHAVIOUR[,...], e.g. "
                                "0.2:model_replacement,weight_inflation."),
    heldout: Path = typer.Option(None, "--heldout", help="Held-out file: loss of the initial and "
                                 "final adapter."),
    threads: int = typer.Option(1, "--threads", help="Torch threads per virtual volunteer."),
    cpus: float = typer.Option(1.0, "--cpus", help="Ray CPUs per virtual volunteer."),
    gpus: float = typer.Option(0.0, "--gpus", help="GPU fraction per virtual volunteer."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps."),
    ray_address: str = typer.Option(None, "--ray-address", help="Join this Ray cluster (default: "
                                    "a local one)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data split and of who is hostile."),
) -> None:
    """Rehearse the project on Flower's Simulation Engine; state goes to DIR/rehearsals/<time>/."""
    from loracommons.client._data_files import DataError
    from loracommons.coordinator.config import ConfigError
    from loracommons.rehearsal_data import Split, SplitError
    from loracommons.rehearsal_report import flagged_lines, round_table
    from loracommons.rehearse import Hostile, RehearsalError, RehearsalSettings
    from loracommons.rehearse import rehearse as run_rehearsal

    try:
        settings = RehearsalSettings(
            volunteers=volunteers, data=data, split=Split.parse(split), rounds=rounds, per_round=per_round,
            steps=steps, hostile=Hostile.parse(hostile), threads=threads, cpus=cpus, gpus=gpus,
            device=device, ray_address=ray_address, heldout=heldout, seed=seed)

        def on_event(event: Event) -> None:
            if event.name in ("round_open", "round_closed", "published"):
                console.print(Text(f"{time.strftime('%H:%M:%S')} {event.line()}"), highlight=False)

        folder, report = run_rehearsal(directory, settings, on_event)
    except (ConfigError, DataError, SplitError, RehearsalError) as exc:
        raise fail(str(exc)) from None
    console.print(round_table(report))
    for line in flagged_lines(report) or ["no update rejected or clipped"]:
        console.print(Text(f"  {line}"), highlight=False)
    if "heldout" in report:
        console.print(Text(f"  held-out loss: {json.dumps(report['heldout'])}"), highlight=False)
    console.print(Text(f"report: {folder / 'report.json'}"), highlight=False)
