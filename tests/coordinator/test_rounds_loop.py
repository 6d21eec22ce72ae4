"""The round loop against a stand-in Grid: what it writes to a real store, what it asks for.

The grid answers each node's task with whatever that node's function makes of it (an envelope
signed for the task's nonce, or None: the node never answers), so the loop runs as it does
against a SuperLink, minus the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.rounds import LATE_ROUNDS, Coordinator, GlobalAdapter
from loracommons.coordinator.store import Store
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.envelope import Envelope
from loracommons.protocol.errors import Reason
from loracommons.protocol.flower_app import envelope_content, read_task
from loracommons.protocol.identity import SigningKey

from .conftest import Signer, make_global, make_update

Node = Callable[[Signer], Envelope | None]


class Grid:
    """Pushes record the task; pulls answer the ids asked for whose node has answered."""

    def __init__(self, cfg: ProjectConfig, global_tensors: dict, nodes: dict[int, Node]):
        self.cfg, self.global_tensors, self.nodes = cfg, global_tensors, nodes
        self.replies: dict[str, Envelope] = {}
        self.asked: list[int] = []  # how many message ids each pull asked for
        self._next = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        ids = []
        for message in messages:
            self._next += 1
            mid = f"m{self._next}"
            task = json.loads(read_task(message.content)[0])
            signer = Signer(self.cfg, self.global_tensors, round=task["round"], nonce=task["nonce"])
            envelope = self.nodes[message.metadata.dst_node_id](signer)
            if envelope is not None:
                self.replies[mid] = envelope
            ids.append(mid)
        return ids

    def pull_messages(self, ids) -> list:  # noqa: ANN001
        self.asked.append(len(ids))
        out = []
        for mid in ids:
            if mid in self.replies:
                env = self.replies.pop(mid)
                content = envelope_content(env.manifest, env.payload, env.signature)
                out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                           has_error=lambda: False, content=content))
        return out


def honest(g: dict, rng: np.random.Generator, train: float, evaluation: float | None) -> Node:
    key = SigningKey.generate()
    scored = {} if evaluation is None else {"eval_loss": evaluation, "eval_tokens": 200}
    return lambda s: s.envelope(make_update(g, "ffa", rng), key=key, examples=20, train_loss=train, **scored)


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's `Message` reads the run id of the task this process runs."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, 22, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = before


def coordinator(tmp_path, g: dict, **rounds) -> Coordinator:
    cfg = ProjectConfig.from_dict({"round": {"volunteers_per_round": 10, "min_volunteers": 2,
                                             "timeout_s": 0.3, "publish_every": 1000, **rounds}})
    coord = Coordinator(tmp_path, cfg, Store(tmp_path), SigningKey.generate("coordinator"))
    coord.global_adapter = GlobalAdapter.from_bytes(encode_tensors(g))
    return coord


@pytest.mark.parametrize(("train", "evaluation"), [(-1e6, 1e9), (1e9, -1e6), (float("nan"), 0.0)])
def test_one_volunteer_does_not_set_the_rounds_losses(tmp_path, rng, train, evaluation):
    """Issue 15, item 7: the round's train and eval loss are medians of bounded claims."""
    g = make_global(rng)
    coord = coordinator(tmp_path, g)
    trains, evals = [1.0, 1.1, 1.2, 1.3], [2.0, 2.1, 2.2, 2.3]
    nodes = {i: honest(g, rng, t, e) for i, (t, e) in enumerate(zip(trains, evals, strict=True))}
    hostile_key = SigningKey.generate()

    def hostile(s: Signer) -> Envelope:
        # a negative eval loss is signed as claimed; the coordinator's manifest parse refuses it
        evaluated = {"eval_loss": evaluation, "eval_tokens": 10**6}
        claims = {"train_loss": train} if train == train else {}  # NaN cannot be signed: leave the default
        return s.envelope(make_update(g, "ffa", rng), key=hostile_key, examples=10**4, **claims, **evaluated)

    nodes[9] = hostile
    row = coord.run_round(Grid(coord.cfg, g, nodes), 1, sorted(nodes))
    refused = evaluation < 0  # -1e6: refused whole as malformed, so it moves nothing
    assert row.status == "aggregated" and row.admitted == 5 - refused
    rejected = [(u.reason, u.message) for u in coord.store.round_updates(1) if u.outcome == "rejected"]
    assert rejected == ([(Reason.MALFORMED, "manifest field 'eval_loss' is negative")] if refused else [])
    spread = max(trains) - min(trains)
    assert abs(row.train_loss - float(np.median(trains))) < spread
    assert abs(row.eval_loss - float(np.median(evals))) < max(evals) - min(evals)
    assert coord.store.round(1).eval_loss == row.eval_loss


def test_eval_loss_is_the_median_of_the_updates_that_report_one(tmp_path, rng):
    g = make_global(rng)
    coord = coordinator(tmp_path, g)
    nodes = {1: honest(g, rng, 1.0, 3.0), 2: honest(g, rng, 1.0, None), 3: honest(g, rng, 1.0, 2.0)}
    row = coord.run_round(Grid(coord.cfg, g, nodes), 1, sorted(nodes))
    assert row.status == "aggregated" and row.eval_loss == pytest.approx(2.5)
    silent = {1: honest(g, rng, 1.0, None), 2: honest(g, rng, 1.0, None)}
    assert coord.run_round(Grid(coord.cfg, g, silent), 2, [1, 2]).eval_loss is None


def test_unanswered_messages_are_forgotten_after_a_few_rounds(tmp_path, rng):
    """Issue 15, item 12: a node that never answers no longer grows what every poll asks for."""
    g = make_global(rng)
    coord = coordinator(tmp_path, g)
    nodes: dict[int, Node] = {1: honest(g, rng, 1.0, 2.0), 2: honest(g, rng, 1.0, 2.0), 3: lambda s: None}
    rounds = LATE_ROUNDS + 4
    grid = Grid(coord.cfg, g, nodes)
    for r in range(1, rounds + 1):
        nodes[1] = honest(g, rng, 1.0, 2.0)  # a fresh key per round: one update per key and round
        nodes[2] = honest(g, rng, 1.0, 2.0)
        grid.global_tensors = coord.global_adapter.tensors
        assert coord.run_round(grid, r, sorted(nodes)).status == "aggregated"
    assert len(coord._late) == LATE_ROUNDS
    assert max(grid.asked) <= 3 + LATE_ROUNDS
    missed = [u for u in coord.store.round_updates(rounds) if u.outcome == "rejected"]
    assert missed == []
