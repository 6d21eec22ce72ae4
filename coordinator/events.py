"""What the round loop tells its watchers: one frozen record per kind of event.

`Coordinator(on_event=...)` receives these; the CLI prints `event.line()`
(`round_open round=3 sampled=2 connected=2`), which the benches and fault trials
read back from the coordinator's output, so the line format is part of the contract:
the event's name, then `field=value` for every field in declaration order, fields
that are None or empty left out. Values are printed with `str` (a float in full).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Event:
    """Base of every event; `name` is the word that starts its line."""

    name: ClassVar[str]

    def details(self) -> dict[str, Any]:
        """The event's fields, without those left empty."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and value != "":
                out[f.name] = value
        return out

    def line(self) -> str:
        """`name k=v ...`: what the CLI prints after its time stamp."""
        return " ".join([self.name, *(f"{k}={v}" for k, v in self.details().items())])


OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class Resumed(Event):
    name = "resume"
    round: int
    note: str = "interrupted round will run again"


@dataclass(frozen=True)
class Waiting(Event):
    name = "waiting"
    connected: int
    needed: int


@dataclass(frozen=True)
class RoundOpened(Event):
    name = "round_open"
    round: int
    sampled: int
    connected: int


@dataclass(frozen=True)
class UpdateHandled(Event):
    name = "update"
    round: int
    accepted: bool
    reason: str
    signer: str = ""  # fingerprint prefix, once the signature verified
    staleness: int | None = None  # async: versions closed since the update's base


@dataclass(frozen=True)
class TaskSent(Event):
    """Async: one task pushed to a free node (its serial is the task's round field)."""

    name = "task_sent"
    task: int
    version: int  # the version open (it trains from version - 1)
    node: int


@dataclass(frozen=True)
class RoundClosed(Event):
    name = "round_closed"
    round: int
    status: str  # "aggregated" or "skipped"
    admitted: int | None = None
    rejected: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Published(Event):
    name = "published"
    version: int
    round: int


@dataclass(frozen=True)
class PrivacyBudgetSpent(Event):
    name = "privacy_budget_spent"
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_noise_multiplier: float | None = None


@dataclass(frozen=True)
class Finished(Event):
    name = "finished"
    rounds: int
