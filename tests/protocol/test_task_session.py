"""A task session's end never raises, even when its heartbeat thread died before it."""

from __future__ import annotations

from loracommons.protocol.flower_runtime import TaskSession


class _Client:
    def __init__(self) -> None:
        self.closed, self.pushed = False, 0

    def PushTaskOutput(self, request: object) -> None:  # noqa: N802 (Flower's method name)
        self.pushed += 1

    def close(self) -> None:
        self.closed = True


class _DeadHeartbeat:
    def stop(self) -> None:
        raise RuntimeError("Heartbeat sender is not running.")


def test_finish_after_the_heartbeat_died_still_pushes_and_closes():
    """A 401 from a restarted SuperNode ends the heartbeat thread; `finish` used to raise then, which
    ended the node's runner thread: the volunteer stayed connected and never trained again."""
    client = _Client()
    session = TaskSession.__new__(TaskSession)  # without starting a real heartbeat thread
    session.client, session.context, session._heartbeat = client, None, _DeadHeartbeat()
    session.finish(False, "lost")
    assert client.pushed == 1 and client.closed
