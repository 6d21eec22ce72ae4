"""The volunteers' ClientApp on Flower's Simulation Engine (`coordinator rehearse`).

A virtual SuperNode's node config holds only its partition id. `rehearsal_app(folder)`
turns that id into the node config `loracommons join` would set for that volunteer
(its data share, its key, threads, device; written by the rehearsal into
FOLDER/volunteers/NNNN/node.json) and calls the installed ClientApp's own `train`
with it, so every virtual volunteer trains and signs exactly as a real one. A volunteer
the rehearsal made hostile has its reply changed afterwards (`rehearsal_faults`).

The returned ClientApp is pickled into Ray's workers with the folder path in it: on a
Ray cluster of several machines, the folder must be on a file system they all see.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from loracommons.client import client_app, rehearsal_faults
from loracommons.client.volunteer import Volunteer
from loracommons.protocol.codec import DTYPES, encode_tensors
from loracommons.protocol.envelope import Envelope
from loracommons.protocol.flower_app import envelope_content, read_envelope, read_task
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask

NODE_FILE = "node.json"
FAULT_KEY = "rehearsal-fault"
"""The node config key naming a virtual volunteer's hostile behaviour (absent: honest)."""


def volunteer_dir(folder: str | Path, partition: int) -> Path:
    return Path(folder) / "volunteers" / f"{partition:04d}"


def node_config_of(folder: str | Path, partition: int) -> dict[str, str]:
    """The node config of virtual volunteer `partition` (as `join` would set it, plus its fault)."""
    return dict(json.loads((volunteer_dir(folder, partition) / NODE_FILE).read_text()))


def corrupt(reply: Message, msg: Message, fault: str, identity: str, volunteer: Volunteer) -> Message:
    """`reply` with its envelope changed by `fault` and signed again by the volunteer's key."""
    if reply.has_error():
        return reply
    task = RoundTask.from_bytes(read_task(msg.content)[0])
    envelope = Envelope(*read_envelope(reply.content, task.max_payload_bytes))
    # the task carries a downlink (B only, a delta...): the global is the one the volunteer rebuilt
    held = volunteer.held
    if held is None or held.digest != task.base_adapter_digest:
        raise RuntimeError("the volunteer holds no checked global adapter for this task")
    adapter = encode_tensors(held.tensors, dtype="float32")
    changed = rehearsal_faults.get(fault)(envelope, task, adapter, SigningKey.load(identity))
    itemsize = DTYPES[task.payload_dtype][1]
    return Message(envelope_content(changed.manifest, changed.payload, changed.signature, itemsize),
                   reply_to=msg)


def rehearsal_app(folder: str) -> ClientApp:
    """The ClientApp every virtual volunteer of the rehearsal in `folder` runs."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = node_config_of(folder, int(context.node_config["partition-id"]))
        fault = config.pop(FAULT_KEY, "")
        node = Context(run_id=context.run_id, node_id=context.node_id, node_config=dict(config),
                       state=context.state, run_config=context.run_config)
        reply = client_app.train(msg, node)
        if not fault:
            return reply
        return corrupt(reply, msg, fault, config["identity"], client_app.volunteer_for(dict(config)))

    return app
