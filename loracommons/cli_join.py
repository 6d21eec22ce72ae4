"""`loracommons join`: contribute to a community adapter with your GPU (or CPU) and private data."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from loracommons.cli_common import err_console
from loracommons.client.volunteer import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_STEPS
from loracommons.paths import data_dir, default_identity

console = Console(soft_wrap=True)  # status lines stay whole in logs and pipes


def fail(message: str, code: int = 1) -> typer.Exit:
    """One error line, never wrapped (a long path would otherwise span lines when piped or logged)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def community_line(details: dict) -> str | None:
    """The volunteer's own answer to "does joining help me?" from a `sent` status (client/volunteer.py):
    the community adapter it received against its previous round's adapter, on its held-out split."""
    community, own = details.get("community_loss"), details.get("own_loss")
    if community is None:  # too small a held-out split to score (volunteer.MIN_EVAL_EXAMPLES)
        return None
    alone = f"{own:.3f}" if own is not None else "none yet"
    return (f"round {details['round']}: community adapter on your held-out data: loss {community:.3f} "
            f"(your last update alone: {alone})")


class JoinView:
    """One status line per round, a live line while training; optionally a JSON status file."""

    def __init__(self, status_file: Path | None, live: bool):
        self.status_file = status_file
        self.state: dict = {"state": "starting", "rounds_sent": 0, "updated": time.time()}
        self.lock = threading.Lock()
        self.live = Live(console=console, refresh_per_second=4, transient=True) if live else None

    def _write(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        tmp.write_text(json.dumps(self.state, default=str))
        os.replace(tmp, self.status_file)

    def say(self, line: str) -> None:
        # text from the coordinator (notes, reasons) is never Rich markup
        console.print(f"{time.strftime('%H:%M:%S')} {escape(line)}", highlight=False)

    def event(self, state: str, details: dict) -> None:
        with self.lock:
            self.state.update(details, state=state, updated=time.time())
            if state == "sent":
                self.state["rounds_sent"] += 1
            self._write()
        if state == "training":
            step, total = details.get("step", 0), details.get("max_steps", "?")
            loss = details.get("loss")
            text = f"round {details['round']}: training step {step}/{total}"
            if loss is not None:
                text += f"  loss {loss:.3f}  {details.get('tokens_per_s', 0):.0f} tok/s"
            if self.live is not None:
                self.live.update(Text(text))
            return
        if state == "sent":
            eval_loss = details.get("eval_loss")
            held = f", held-out loss {eval_loss:.3f}" if eval_loss else ""
            self.say(f"round {details['round']}: update sent ({details['steps']} steps, train loss "
                     f"{details['train_loss']:.3f}{held}, {details['bytes'] / 1024:.0f} KiB, "
                     f"{details['seconds']:.1f} s)")
            line = community_line(details)
            if line is not None:
                self.say(line)
        elif state == "note":
            outcome = details.get("outcome")
            if outcome:
                self.say(f"round {details.get('round')}: your update was {outcome}"
                         + (f" ({details['reason']})" if outcome != "admitted" else ""))
                with self.lock:
                    self.state["last_outcome"] = details
                    self._write()
        elif state == "connecting":
            self.say(f"connecting to {details['superlink']} ...")
        elif state == "connected":
            self.say(f"connected to {details['superlink']}{' again' if details.get('again') else ''}; "
                     "waiting for a round")
        elif state == "unreachable":
            self.say(f"cannot connect to {details['superlink']}: {details['error']}; retrying by itself "
                     f"(next try in {details['in_seconds']:.1f} s; SuperNode log {details['log']})")
        elif state == "flower_home":
            self.say(f"another node runs in {details['taken']}; this one keeps its Flower files in "
                     f"{details['path']}")
        elif state == "bound":
            self.say(f"joined project {details['project']} at {details['superlink']}: tasks of any other "
                     "project will be refused")
        elif state == "rank":
            self.say(f"round {details['round']}: training rank {details['rank']} of the project's "
                     f"{details['project_rank']} ({details['why']})")
        elif state == "capped":
            cut = ", ".join(f"{name} {asked} -> {used}" for name, (asked, used) in details["fields"].items())
            self.say(f"round {details['round']}: task cut to your caps ({cut})")
        elif state == "reconnecting":
            self.say(f"connection lost (SuperNode exit {details['exit_code']}); "
                     f"reconnecting in {details['in_seconds']:.0f} s")
        elif state == "refused":
            if "run" in details:
                self.say("refused a run whose app differs from the installed loracommons: "
                         f"{details['reason']}")
            else:  # a task of another project (client/binding.py): the reason says which
                self.say(details["reason"])
        elif state == "failed":
            self.say(f"round failed: {details['reason']}")
        elif state == "stopped":
            self.say("stopped")


def rank_line(max_rank: int | None, device: str) -> str:
    """What the startup line says of the LoRA rank this node will train (see `volunteer.round_rank`)."""
    if max_rank is not None:
        return f"rank: at most {max_rank} (--max-rank; below the project's rank in ffa projects only)"
    from loracommons.client.model import ModelError, pick_device

    try:
        gpu = pick_device(device).type == "cuda"
    except ModelError:
        gpu = False  # the node reports the bad device itself
    if gpu:
        return "rank: the project's, or the largest of r/2, r/4 ... that fits half the free GPU memory"
    return "rank: the project's"


def join(
    coordinator: str = typer.Argument(..., help="The coordinator's SuperLink address, HOST:PORT."),
    data: Path = typer.Option(..., "--data", help="Your private training data (JSONL, CSV, Parquet, "
                              "text, or a `datasets` folder). It never leaves this machine."),
    identity: Path = typer.Option(None, "--identity", help="Your key (created on first use)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps."),
    max_minutes: float = typer.Option(None, "--max-minutes-per-round", help="Your cap on training time."),
    max_steps: int = typer.Option(DEFAULT_MAX_STEPS, "--max-steps-per-round", min=1,
                                  help="Your cap on optimizer steps per round."),
    max_batch_size: int = typer.Option(DEFAULT_MAX_BATCH_SIZE, "--max-batch-size", min=1,
                                       help="Your cap on sequences per micro-batch."),
    max_seq_len: int = typer.Option(DEFAULT_MAX_SEQ_LEN, "--max-seq-len", min=8,
                                    help="Your cap on tokens per training sequence."),
    max_rank: int = typer.Option(None, "--max-rank", min=1,
                                 help="Your cap on the LoRA rank you train (ffa projects: you train "
                                 "the first N components; default: the project's rank, lower on a GPU "
                                 "whose free memory is short)."),
    project: str = typer.Option(None, "--project", help="The project id you join: tasks of any other "
                                "project are refused (default: the first project seen at this address)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS: only for a local test coordinator."),
    root_certificates: Path = typer.Option(None, "--root-certificates", help="CA certificate (PEM) "
                                           "of the coordinator."),
    name: str = typer.Option(None, "--name", help="Display name (kept on this machine for now)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for training."),
    max_steps_per_second: float = typer.Option(None, "--max-steps-per-second",
                                               help="Your pace cap: a task of S steps takes at least S / X "
                                               "seconds, its evaluation included (share the machine)."),
    status_file: Path = typer.Option(None, "--status-file", help="Also write status as JSON here."),
    node_auth: bool = typer.Option(False, "--node-auth/--no-node-auth",
                                   help="Authenticate the SuperNode with your key: allowlist projects "
                                   "(needs TLS; the operator registers your .pub first)."),
) -> None:
    """Join a community project: train on your data each round, send signed LoRA updates."""
    from loracommons.client.data import DataError, load_records
    from loracommons.protocol import SigningKey
    from loracommons.protocol.task import PROJECT_ID_RE

    if insecure == (root_certificates is not None):
        raise fail("give either --root-certificates CA.pem (the coordinator's CA) or --insecure "
                   "(local test coordinators only)")
    if project is not None and not PROJECT_ID_RE.match(project):
        raise fail(f"--project {project!r} is not a project id (1-64 of a-z 0-9 . _ -)")
    if max_minutes is not None and not 0 < max_minutes < float("inf"):
        raise fail(f"--max-minutes-per-round must be a positive number, got {max_minutes}")
    if max_steps_per_second is not None and not 0 < max_steps_per_second < float("inf"):
        raise fail(f"--max-steps-per-second must be a positive number, got {max_steps_per_second}")
    if root_certificates is not None and not root_certificates.exists():
        raise fail(f"{root_certificates} does not exist")
    try:
        records = load_records(data)  # a malformed file stops here, before any model loads
    except (DataError, OSError) as exc:
        raise fail(str(exc)) from None
    identity = identity or default_identity()
    if not identity.exists():
        key = SigningKey.generate("volunteer")
        try:
            key.save(identity)
        except OSError as exc:  # e.g. a lone .pub left behind, or an unwritable folder
            raise fail(f"cannot create your identity {identity}: {exc}") from None
        console.print(f"created your volunteer identity {identity} (fingerprint {key.public.short}); "
                      "keep it: it is how the project credits your work", highlight=False)
    try:
        public = SigningKey.load(identity).public
    except Exception as exc:
        raise fail(str(exc)) from None
    from loracommons.client import client_app
    from loracommons.client.node import NodeError, NodeOptions, run_node

    node_home = data_dir() / "node" / public.fingerprint[:16]
    node_config = {"data-path": str(data.resolve()), "identity": str(identity.resolve()), "device": device,
                   "max-steps": str(max_steps), "max-batch-size": str(max_batch_size),
                   "max-seq-len": str(max_seq_len), "superlink": coordinator,
                   "bindings": str(node_home / "projects.json")}
    if project is not None:
        node_config["project"] = project
    if max_minutes is not None:
        node_config["max-minutes"] = str(max_minutes)
    if threads is not None:
        node_config["threads"] = str(threads)
    if max_rank is not None:
        node_config["max-rank"] = str(max_rank)
    if max_steps_per_second is not None:
        node_config["max-steps-per-second"] = str(max_steps_per_second)
    home = Path(os.environ.get("FLWR_HOME") or node_home)  # run_node takes a folder of its own below it
    use_auth = node_auth
    opts = NodeOptions(superlink=coordinator, node_config=node_config, insecure=insecure,
                       root_certificates=str(root_certificates.resolve()) if root_certificates else None,
                       auth_key=str(identity.resolve()) if use_auth else None, flwr_home=home)
    view = JoinView(status_file, live=console.is_terminal)
    joined = (f"volunteer {public.short}{f' ({name})' if name else ''}: {len(records)} examples in "
              f"{data} (stay on this machine); coordinator {coordinator}; {rank_line(max_rank, device)}"
              + (" [INSECURE: local test only]" if insecure else ""))
    console.print(escape(joined), highlight=False)
    client_app.set_status_callback(view.event)
    try:
        if view.live is not None:
            view.live.start()
        run_node(opts, on_event=view.event)
    except NodeError as exc:
        raise fail(str(exc)) from None
    finally:
        if view.live is not None:
            view.live.stop()
        client_app.set_status_callback(None)
