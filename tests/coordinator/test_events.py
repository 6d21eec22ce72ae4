"""The round loop's event lines: the benches and fault trials parse them, so their format is fixed."""

from __future__ import annotations

import dataclasses

import pytest

from loracommons.coordinator.events import (
    Finished,
    PrivacyBudgetSpent,
    Published,
    Resumed,
    RoundClosed,
    RoundOpened,
    UpdateHandled,
    Waiting,
)
from loracommons.protocol.errors import Reason


@pytest.mark.parametrize(("event", "line"), [
    (RoundOpened(1, 2, 3), "round_open round=1 sampled=2 connected=3"),
    (UpdateHandled(1, True, "accepted", "aaaa0000bbbb1111"),
     "update round=1 accepted=True reason=accepted signer=aaaa0000bbbb1111"),
    (UpdateHandled(3, False, Reason.LATE), "update round=3 accepted=False reason=late"),
    (RoundClosed(2, "aggregated", 2, 0, 1.5, 2.25), "round_closed round=2 status=aggregated admitted=2 "
     "rejected=0 train_loss=1.5 eval_loss=2.25"),
    (RoundClosed(2, "skipped", note="only 1 of 2 required"),
     "round_closed round=2 status=skipped note=only 1 of 2 required"),
    (Resumed(4), "resume round=4 note=interrupted round will run again"),
    (Waiting(1, 2), "waiting connected=1 needed=2"),
    (Published(3, 6), "published version=3 round=6"),
    (PrivacyBudgetSpent(1.5, 1e-05, 2.0), "privacy_budget_spent dp_epsilon=1.5 dp_delta=1e-05 "
     "dp_noise_multiplier=2.0"),
    (Finished(5), "finished rounds=5"),
])
def test_event_lines(event, line):
    assert event.line() == line


def test_events_are_frozen_and_details_drop_empty_fields():
    event = UpdateHandled(3, False, Reason.LATE)
    assert event.details() == {"round": 3, "accepted": False, "reason": "late"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.round = 4  # type: ignore[misc]
