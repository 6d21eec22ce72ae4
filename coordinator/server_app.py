"""The installed Flower ServerApp of a coordinator.

`coordinator start` runs it inside its own process (see `superlink.py`), so
the hooks below connect it to that process's stop signal and live view.
"""

from __future__ import annotations

import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from loracommons.coordinator.events import Event, OnEvent
from loracommons.coordinator.rounds import Coordinator

app = ServerApp()

stop_event = threading.Event()
_on_event: list[OnEvent] = []


def set_event_callback(callback: OnEvent | None) -> None:
    _on_event[:] = [callback] if callback else []


def _event(event: Event) -> None:
    for callback in _on_event:
        callback(event)


def coordinator_for(project_dir: str) -> type[Coordinator]:
    """The loop of the project's `[round] schedule`: sync rounds, or the async buffer."""
    from loracommons.coordinator.async_rounds import AsyncCoordinator
    from loracommons.coordinator.config import load_config

    return AsyncCoordinator if load_config(project_dir).round.schedule == "async" else Coordinator


@app.main()
def main(grid: Grid, context: Context) -> None:
    project_dir = str(context.run_config["project-dir"])
    coordinator = coordinator_for(project_dir).open(project_dir, stop=stop_event, on_event=_event)
    try:
        coordinator.run(grid)
    finally:
        coordinator.store.close()
