"""The installed Flower ClientApp of a volunteer node.

The node runner (`client/node.py`) calls this object in its own long-lived
process, so the base model (and, in `ffa`, the A factors regenerated from the
seed, and the last global adapter a delta applies to) stays between rounds.
The message carries the round task and the global adapter (`protocol/downlink.py`);
the reply carries the signed envelope (message layout in `protocol/flower_app.py`).
"""

from __future__ import annotations

import threading

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from loracommons.client.binding import ProjectBinding
from loracommons.client.volunteer import OnStatus, Volunteer, load_volunteer
from loracommons.protocol.codec import DTYPES
from loracommons.protocol.downlink import Downlink
from loracommons.protocol.flower_app import envelope_content, read_downlink, read_task
from loracommons.protocol.task import RoundTask

app = ClientApp()

_lock = threading.Lock()
_volunteers: dict[tuple, Volunteer] = {}
_on_status: list[OnStatus] = []


def set_status_callback(callback: OnStatus | None) -> None:
    """Where this process's volunteer reports progress (the `join` view)."""
    _on_status[:] = [callback] if callback else []


def _status(state: str, details: dict) -> None:
    for callback in _on_status:
        callback(state, details)


def volunteer_for(node_config: dict) -> Volunteer:
    """One `Volunteer` per node config, kept for the life of the process."""
    key = tuple(sorted((k, str(v)) for k, v in node_config.items()))
    with _lock:
        if key not in _volunteers:
            _volunteers.clear()
            _volunteers[key] = load_volunteer(dict(node_config), _status)
        return _volunteers[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    volunteer = volunteer_for(dict(context.node_config))
    task_json, adapter, note = read_task(msg.content)
    task = RoundTask.from_bytes(task_json)
    header = read_downlink(msg.content)
    downlink = Downlink.from_bytes(header) if header is not None else None
    binding = ProjectBinding.from_node_config(dict(context.node_config))
    if binding is not None and binding.check(task.project_id):  # WrongProject: refused, nothing signed
        _status("bound", {"project": task.project_id, "superlink": binding.superlink})
    if note:
        _status("note", {"round": task.round, **note})
    envelope = volunteer.run_round(task, adapter, downlink)
    itemsize = DTYPES[task.payload_dtype][1]
    return Message(envelope_content(envelope.manifest, envelope.payload, envelope.signature, itemsize),
                   reply_to=msg)
