"""The `loracommons` command: entry points only; the work lives in the packages.

    loracommons identity new            # create your volunteer key
    loracommons join HOST:PORT --data my.jsonl
    loracommons coordinator init DIR --base-model PATH
    loracommons download URL --out DIR
    loracommons demo
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from loracommons import __version__, cli_download, cli_join  # none imports torch or flwr at import
from loracommons.cli_common import fail
from loracommons.cli_coordinator import app as coordinator_app
from loracommons.demo.community import DemoSettings  # imports neither torch nor flwr
from loracommons.paths import default_identity
from loracommons.protocol import ProtocolError, PublicKey, SigningKey

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="LoRA Commons: train a shared LoRA adapter with a community, verifiably.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
identity_app = typer.Typer(help="Your volunteer identity (an ECDSA P-256 key).", no_args_is_help=True)
app.add_typer(identity_app, name="identity")


#: The libraries' own switches for their progress bars and advisory messages, read when they are
#: first imported (after this runs: the commands import them lazily) and by the processes the demo
#: starts. A value the user set in the environment wins.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def configure_output(verbose: bool) -> None:
    """Logging for the whole command. Library progress bars ("Loading weights") and Python warnings
    (e.g. a deprecation inside transformers) are for developers: shown with --verbose only.
    Warnings go to logging (the `py.warnings` logger), which hides them below --verbose; no warning
    filter is installed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    if verbose:
        return
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def skip_the_final_collection() -> None:
    """At exit, freeze every live object out of the interpreter's last garbage collection: with torch,
    transformers and flwr loaded, that collection walked the whole heap for 2-4 s after a `join` had
    already said "stopped" (measured on 2 cores). Registered first, it runs after every other exit
    handler; objects are still freed as their modules are torn down."""
    atexit.register(gc.freeze)


def _version(value: bool) -> None:
    if value:
        console.print(f"loracommons {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Log debug details, library progress bars and warnings."),
) -> None:
    configure_output(verbose)
    skip_the_final_collection()


@identity_app.command("new")
def identity_new(
    out: Path = typer.Option(None, "--out", help="Private key path (default: user config dir)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key."),
) -> None:
    """Create a volunteer identity: private key (mode 0600) and `.pub` beside it."""
    path = out or default_identity()
    key = SigningKey.generate("volunteer")
    try:
        key.save(path, force=force)
    except FileExistsError as exc:
        raise fail(str(exc)) from None
    console.print(f"identity written to {path} (public key {path}.pub)", highlight=False)
    console.print(f"fingerprint: {key.public.fingerprint}", highlight=False)
    console.print(f"short:       {key.public.short}", highlight=False)


@identity_app.command("show")
def identity_show(
    key: Path = typer.Option(None, "--key", help="Private or public key file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print the fingerprint and public key of an identity."""
    path = key or default_identity()
    try:
        if path.suffix == ".pub":
            public = PublicKey.load(path)
        elif path.with_name(path.name + ".pub").exists() or path.exists():
            public = SigningKey.load(path).public
        else:
            raise fail(f"no identity at {path}; create one with `loracommons identity new`")
    except ProtocolError as exc:
        raise fail(str(exc)) from None
    info = {"fingerprint": public.fingerprint, "short": public.short, "public_key": public.openssh,
            "path": str(path)}
    if as_json:
        print(json.dumps(info))
    else:
        for name, value in info.items():
            console.print(escape(f"{name}: {value}"), highlight=False)


@app.command("demo")
def demo(
    volunteers: int = typer.Option(3, "--volunteers", min=2, max=8, help="Volunteers in the community."),
    rounds: int = typer.Option(DemoSettings.rounds, "--rounds", min=1, max=1000, help="Federated rounds."),
    steps: int = typer.Option(DemoSettings.steps_per_round, "--steps-per-round", min=1, max=1000,
                              help="Training steps per volunteer per round."),
    publish_every: int = typer.Option(DemoSettings.publish_every, "--publish-every", min=1,
                                      help="A signed release every k rounds (and after the last)."),
    server_lr: float = typer.Option(DemoSettings.server_lr, "--server-lr", min=0.01, max=4.0,
                                    help="[aggregation] server_lr: the server step on each round's "
                                    "mean delta (1 = the plain mean)."),
    lr_schedule: str = typer.Option(DemoSettings.lr_schedule, "--lr-schedule", help="[round] lr_schedule: "
                                    "constant, or cosine from the peak down to a tenth over the rounds."),
    out: Path = typer.Option(Path("loracommons-demo"), "--out", help="Output folder (new or empty)."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Keep the coordinator, volunteers "
                                      "and dashboard running after the report, until Ctrl-C."),
    schedule: str = typer.Option("sync", "--schedule", help="sync rounds, or async: every volunteer kept "
                                 "busy, a new version every `volunteers` updates (then --rounds counts "
                                 "versions)."),
    train_references: bool = typer.Option(False, "--train-references", help="Train each volunteer "
                                           "alone and the pooled trainer here, even where their scores "
                                           "are recorded for exactly these inputs."),
) -> None:
    """A whole community on this machine: coordinator + volunteers on an embedded tiny model."""
    from loracommons.coordinator.config import LR_SCHEDULES
    from loracommons.demo.community import DemoError, run_demo

    try:
        if schedule not in ("sync", "async"):
            raise fail(f"--schedule must be sync or async, got {schedule!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise fail(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
        settings = DemoSettings(volunteers=volunteers, rounds=rounds, steps_per_round=steps,
                                publish_every=publish_every, schedule=schedule, server_lr=server_lr,
                                lr_schedule=lr_schedule, train_references=train_references)
        run_demo(out, settings, console, keep_running)
    except DemoError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; every process the demo started was stopped", 130) from None


app.command("download")(cli_download.download)
app.command("join")(cli_join.join)
app.add_typer(coordinator_app, name="coordinator")
