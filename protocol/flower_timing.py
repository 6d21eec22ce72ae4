"""Flower 1.42's fixed waits on a round's path, paced for rounds that last seconds.

A round crosses four polls and three object downloads. Flower waits a fixed time
at each, and none of it is configurable through a public API:

- the SuperNode loop (`flwr.supernode.start_client_internal`) sleeps 3 s after a
  pull that found no message, and 0.5 s per check while it waits for the app's
  reply. A node that has just replied pulls once, finds the next round not open
  yet and sleeps 3 s. The loop is one function that also owns the connection,
  so it cannot be reused around another wait: `SuperNodeClock` replaces that
  module's `time`, and paces those two sleeps (other sleeps pass unchanged);
- a reader that finds a message whose objects are not uploaded yet backs off 1 s,
  then 2 s (`PULL_INITIAL_BACKOFF`, bound as a default when Flower is imported).
  Flower stores a message before its objects arrive, so a quick poll meets this
  on every hop: the SuperNode pulling a task from the SuperLink, the node's runner
  taking it from the SuperNode, the coordinator pulling a reply.
  `quick_object_pulls` rebinds the puller those modules call to start at 10 ms
  (doubling, so a slow upload is still not hammered). The node's runner meets it
  every round: its SuperNode hands it the task as soon as the message is pulled,
  before the message's objects are.

Load on the SuperLink: only a node that has just handled a message polls quickly, so
the burst after a round is at most 25 pulls a second from each volunteer sampled in
it, for about 1 s, then 5% of the time waited (10 a second after 2 s), whatever the
size of the community; a node idle for a minute is
back at Flower's 3 s. The other side of that: a node that sat out the last rounds
takes up to 3 s to see a task (rounds that sample a subset pay it).

Both act only on module globals of the process that calls them, and only the
durations named here. tests/protocol/test_flower_timing.py pins the internals
relied on (the sleeps and their branches, the pullers and their backoff), so a
Flower upgrade that changes them fails that test loudly; at run time, a module
that no longer matches is left alone (Flower's own timing, with a warning).
No flwr import until a function here is called.
"""

from __future__ import annotations

import functools
import importlib
import logging
import time
import types
from collections.abc import Callable

from loracommons.protocol.pacing import Pacer

log = logging.getLogger(__name__)

SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
FLOWER_IDLE_SLEEP = 3.0
"""What the SuperNode loop sleeps after a pull that found no message (seconds)."""
FLOWER_REPLY_SLEEP = 0.5
"""What it sleeps per check while waiting for the app's reply or a reply object's content."""

IDLE_FLOOR = 0.04
"""Seconds between pulls right after the node handled a message (then 5% of the idle time, up to 3 s)."""
REPLY_FLOOR = 0.01
"""Seconds between in-process checks for the app's reply at first (up to 0.5 s)."""
NEW_WAIT_GAP = 0.05
"""Seconds between two reply checks after which they count as separate waits."""

OBJECT_PULL_BACKOFF = 0.01
"""First backoff (seconds) when a message's objects are not there yet; Flower's is 1 s."""
PULLERS = {
    "flwr.supernode.start_client_internal": "pull_objects",  # SuperNode <- SuperLink: tasks
    "flwr.supernode.runtime.run_clientapp": "pull_and_inflate_object_from_tree",  # runner <- SuperNode
    "flwr.superlink.grid.http_grid": "pull_objects",  # coordinator <- SuperLink: replies
}
"""Module -> the Flower function it calls to download a message's objects."""


class SuperNodeClock:
    """Stands in for the `time` module of Flower's SuperNode loop; only `sleep` differs."""

    def __init__(self, real: types.ModuleType = time, clock: Callable[[], float] | None = None):
        self._real = real
        now = clock or real.monotonic
        self.idle = Pacer(IDLE_FLOOR, FLOWER_IDLE_SLEEP, clock=now)
        self.reply = Pacer(REPLY_FLOOR, FLOWER_REPLY_SLEEP, clock=now)
        self._now = now
        self._last_reply_check: float | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        self._real.sleep(self.pace(seconds))

    def pace(self, seconds: float) -> float:
        """The sleep that replaces Flower's `seconds`."""
        if seconds == FLOWER_IDLE_SLEEP:
            self._last_reply_check = None
            return self.idle.interval()
        if seconds == FLOWER_REPLY_SLEEP:
            # Waiting for a reply means a message was pulled: the node is in a round, and once
            # it has replied the next task is likely seconds away.
            now = self._now()
            if self._last_reply_check is None or now - self._last_reply_check > NEW_WAIT_GAP:
                self.reply.restart()
            interval = self.reply.interval()
            self._last_reply_check = now + interval
            self.idle.restart()
            return interval
        return seconds


def pace_supernode() -> SuperNodeClock | None:
    """In this process, pace the SuperNode loop's sleeps and its task downloads (before it starts)."""
    target = importlib.import_module(SUPERNODE_LOOP)
    quick_object_pulls(SUPERNODE_LOOP)
    current = getattr(target, "time", None)
    if isinstance(current, SuperNodeClock):
        return current
    if current is not time:
        log.warning("%s has no module-level `time`; keeping Flower's poll intervals", SUPERNODE_LOOP)
        return None
    clock = SuperNodeClock()
    setattr(target, "time", clock)  # noqa: B010 (a module attribute, replaced on purpose)
    return clock


def quick_object_pulls(module_name: str) -> None:
    """In this process, make `module_name` (a key of PULLERS) retry missing objects after 10 ms, not 1 s."""
    module = importlib.import_module(module_name)
    name = PULLERS[module_name]
    puller = getattr(module, name, None)
    if isinstance(puller, functools.partial):
        return
    if puller is None:
        log.warning("%s.%s is gone; keeping Flower's object pull backoff", module_name, name)
        return
    setattr(module, name, functools.partial(puller, initial_backoff=OBJECT_PULL_BACKOFF))
