"""Flower's fixed waits, paced: the policy, and the Flower internals it relies on (a contract).

If a test named `..._as_expected` fails after a Flower upgrade, re-read the Flower code it names
and update protocol/flower_timing.py (or drop the override when Flower's timing is good enough).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import time

import pytest

from loracommons.protocol import flower_timing as timing
from loracommons.protocol.flower_timing import FLOWER_IDLE_SLEEP, FLOWER_REPLY_SLEEP, SuperNodeClock


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sleep_calls(module) -> list[tuple[str, str, float]]:  # noqa: ANN001
    """(enclosing function, attribute of `time` called, its constant argument) for each `time.X(c)`."""
    calls = []
    for func in ast.walk(ast.parse(inspect.getsource(module))):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "time"):
                arg = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else None
                calls.append((func.name, node.func.attr, arg))
    return calls


def test_flower_supernode_loop_sleeps_as_expected():
    """Fails on a Flower upgrade that changes the waits SuperNodeClock paces: re-read the loop then."""
    target = importlib.import_module(timing.SUPERNODE_LOOP)
    assert target.time is time  # the module-level name install() replaces
    calls = sorted(set(sleep_calls(target)))
    assert calls == [("_push_messages", "sleep", FLOWER_REPLY_SLEEP),
                     ("start_client_internal", "sleep", FLOWER_IDLE_SLEEP),
                     ("yield_object_contents", "sleep", FLOWER_REPLY_SLEEP)], calls
    # the 3 s sleep is the branch taken when a pull found no message
    loop = ast.parse(inspect.getsource(target.start_client_internal))
    branches = [node for node in ast.walk(loop) if isinstance(node, ast.If)
                and ast.unparse(node.test) == "run_id is None"]
    assert [ast.unparse(stmt) for branch in branches for stmt in branch.body] == ["time.sleep(3)", "continue"]


def test_idle_polls_are_quick_after_a_round_and_back_off_to_flowers_interval():
    now = FakeClock()
    clock = SuperNodeClock(clock=now)
    assert clock.pace(FLOWER_REPLY_SLEEP) == timing.REPLY_FLOOR  # a task arrived: a round is on
    now.t += 0.5
    assert clock.pace(FLOWER_IDLE_SLEEP) == pytest.approx(timing.IDLE_FLOOR)
    now.t += 10
    assert clock.pace(FLOWER_IDLE_SLEEP) == pytest.approx(0.05 * 10.5)  # 5% of the time since the task
    now.t += 600
    assert clock.pace(FLOWER_IDLE_SLEEP) == FLOWER_IDLE_SLEEP
    assert clock.pace(0.1) == 0.1 and clock.pace(7) == 7  # other sleeps as asked


def test_reply_checks_start_quick_and_slow_down_within_one_wait():
    now = FakeClock()
    clock = SuperNodeClock(clock=now)
    intervals = []
    for _ in range(400):
        intervals.append(clock.pace(FLOWER_REPLY_SLEEP))
        now.t += intervals[-1]
    assert intervals[0] == timing.REPLY_FLOOR and intervals == sorted(intervals)
    assert intervals[-1] == FLOWER_REPLY_SLEEP
    clock.pace(FLOWER_IDLE_SLEEP)  # the reply went out; the next wait starts quick again
    assert clock.pace(FLOWER_REPLY_SLEEP) == timing.REPLY_FLOOR


def test_object_pullers_back_off_as_expected():
    """Flower's pullers start their backoff at 1 s, as a keyword default quick_object_pulls overrides."""
    from flwr.supercore.inflatable import inflatable_utils

    for module_name, name in timing.PULLERS.items():
        module = importlib.import_module(module_name)
        puller = getattr(module, name)
        assert puller is getattr(inflatable_utils, name), (module_name, name)
        parameter = inspect.signature(puller).parameters["initial_backoff"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default == 1, module_name


@pytest.fixture
def restored():
    """Flower's modules as imported, after the test has paced them."""
    modules = {name: importlib.import_module(name) for name in timing.PULLERS}
    saved = {name: (getattr(m, timing.PULLERS[name]), m.__dict__.get("time")) for name, m in modules.items()}
    yield modules
    for name, (puller, clock) in saved.items():
        setattr(modules[name], timing.PULLERS[name], puller)
        if clock is not None:
            modules[name].time = clock


def test_pace_supernode_replaces_the_loops_time_and_puller_only(restored):
    target = restored[timing.SUPERNODE_LOOP]
    clock = timing.pace_supernode()
    assert isinstance(target.time, SuperNodeClock) and target.time is clock
    assert timing.pace_supernode() is clock  # idempotent
    assert target.time.monotonic is time.monotonic and time.sleep is not clock.sleep
    puller = target.pull_objects
    assert puller.keywords == {"initial_backoff": timing.OBJECT_PULL_BACKOFF}
    timing.quick_object_pulls(timing.SUPERNODE_LOOP)
    assert target.pull_objects is puller  # not wrapped twice
    grid = restored["flwr.superlink.grid.http_grid"]
    assert not hasattr(grid.pull_objects, "keywords")  # other modules: untouched until asked


def test_quick_object_pulls_retry_a_missing_object_after_50_ms(restored):
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    timing.quick_object_pulls("flwr.superlink.grid.http_grid")
    tries: list[float] = []

    def pull(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise ObjectUnavailableError(object_id)
        return b"content"

    assert restored["flwr.superlink.grid.http_grid"].pull_objects(["x"], pull) == {"x": b"content"}
    assert tries[-1] - tries[0] < 0.6  # Flower's own backoff: 1 s + 2 s
