"""What each node is sent of the global adapter, and what the loop learns from its reply (issue 14)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from loracommons.coordinator.downlinks import Downlinks, refusal_reason
from loracommons.coordinator.store import Store
from loracommons.protocol.codec import canonical_digest, decode_tensors, round_tensors
from loracommons.protocol.downlink import ALL, SENT, Downlink, Held, rebuild
from loracommons.protocol.errors import Reason
from loracommons.protocol.flower_app import read_downlink, read_task

from .conftest import make_global, make_update
from .test_rounds_loop import Grid, coordinator, honest, task_identity  # noqa: F401 (fixture)


def test_refusal_reason_reads_the_code_a_volunteer_names():
    assert refusal_reason("VolunteerError: downlink_mismatch: rebuilt ...") == Reason.DOWNLINK_MISMATCH
    assert refusal_reason("VolunteerError: base_unavailable: delta ...") == Reason.BASE_UNAVAILABLE
    assert refusal_reason("RuntimeError: CUDA out of memory") is None


def _moved(g: dict, rng: np.random.Generator) -> dict:
    return {n: (t + 1e-3 * rng.normal(size=t.shape) if "lora_B" in n else t).astype(np.float32)
            for n, t in g.items()}


def test_a_node_gets_b_only_then_a_delta_and_the_whole_adapter_after_a_refusal(rng):
    links = Downlinks("ffa", "float32")
    v1 = make_global(rng)
    v2 = _moved(v1, rng)
    d1, d2 = canonical_digest(v1), canonical_digest(v2)
    link, _ = links.for_node(7, d1, v1)
    assert link == Downlink(SENT, "float32", "shuffle4-zlib")
    links.answered(7, d1)
    link, data = links.for_node(7, d2, v2)
    assert link.delta_from == d1
    full = rebuild(link, data, mode="ffa", digest=d2, max_bytes=1 << 24, held=Held(d1, v1),
                   regenerate=lambda: v1)
    assert all(np.array_equal(full[n], v2[n]) for n in v2)
    links.failed(7, Reason.BASE_UNAVAILABLE)  # it restarted: no delta until it answers again
    assert links.for_node(7, d2, v2)[0].delta_from == ""
    links.failed(7, Reason.DOWNLINK_MISMATCH)  # it cannot rebuild A: every tensor from now on
    assert links.for_node(7, d2, v2)[0].tensors == ALL
    assert links.for_node(8, d2, v2)[0].tensors == SENT


def test_an_old_base_is_read_back_from_the_blob_store(tmp_path, rng):
    from loracommons.protocol.codec import encode_tensors

    store = Store(tmp_path)
    links = Downlinks("fedavg", "float32", store.blobs)
    versions = [make_global(rng)]
    for _ in range(5):
        versions.append(_moved(versions[-1], rng))
    d0 = store.blobs.put(encode_tensors(versions[0]))
    links.answered(3, d0)
    for v in versions[1:]:
        links.for_node(1, canonical_digest(v), v)  # the cache keeps only the most recent
    link, _ = links.for_node(3, canonical_digest(versions[-1]), versions[-1])
    assert link.delta_from == d0  # A unchanged and B moved a little: the delta packs smaller
    assert links._version(d0) is not None and links._version("e" * 64) is None


class ErrorGrid(Grid):
    """A node may answer with an error text; every task's downlink header is kept per node."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.sent: dict[int, tuple[Downlink, bytes]] = {}
        self.errors: dict[str, str] = {}

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        for message in messages:
            link = Downlink.from_bytes(read_downlink(message.content))
            self.sent[message.metadata.dst_node_id] = link, read_task(message.content)[1]
        ids = []
        for message in messages:
            node = self.nodes[message.metadata.dst_node_id]
            if isinstance(node, str):
                self._next += 1
                mid = f"m{self._next}"
                self.errors[mid] = node
                ids.append(mid)
            else:
                ids.extend(super().push_messages([message]))
        return ids

    def pull_messages(self, ids) -> list:  # noqa: ANN001
        out = super().pull_messages(ids)
        for mid in [m for m in ids if m in self.errors]:
            text = self.errors.pop(mid)
            out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                       has_error=lambda: True, error=SimpleNamespace(reason=text, code=0)))
        return out


def test_the_loop_records_a_downlink_refusal_and_sends_that_node_everything_next(tmp_path, rng):
    g = make_global(rng)
    coord = coordinator(tmp_path, g)
    nodes = {1: honest(g, rng, 1.0, 2.0), 2: honest(g, rng, 1.0, 2.0),
             3: "VolunteerError: downlink_mismatch: the adapter rebuilt from the task does not match"}
    grid = ErrorGrid(coord.cfg, g, nodes)
    assert coord.run_round(grid, 1, sorted(nodes)).status == "aggregated"
    assert all(grid.sent[n][0].tensors == SENT for n in nodes)  # ffa: B only, to everyone
    reasons = [u.reason for u in coord.store.round_updates(1) if u.outcome == "rejected"]
    assert reasons == ["downlink_mismatch"]
    nodes[1], nodes[2] = honest(g, rng, 1.0, 2.0), honest(g, rng, 1.0, 2.0)
    grid.global_tensors = coord.global_adapter.tensors
    coord.run_round(grid, 2, sorted(nodes))
    assert grid.sent[3][0].tensors == ALL  # the node that refused gets every tensor
    assert grid.sent[1][0].tensors == SENT and grid.sent[1][0].delta_from in ("", canonical_digest(g))
    # every node rebuilds exactly the global the task names
    for node in (1, 3):
        link, data = grid.sent[node]
        held = Held(canonical_digest(g), g)
        full = rebuild(link, data, mode="ffa", digest=coord.store.round(2).base_adapter_digest,
                       max_bytes=1 << 24, held=held, regenerate=lambda: g)
        assert canonical_digest(full) == coord.store.round(2).base_adapter_digest


def test_a_bf16_downlink_rounds_the_global_everyone_trains_from(tmp_path, rng):
    g = make_global(rng)
    coord = coordinator(tmp_path, g, downlink_dtype="bfloat16")
    coord._set_global(coord.global_adapter.data)  # as resume does
    assert coord.global_adapter.digest == canonical_digest(round_tensors(g, "bfloat16"))
    assert coord.store.blobs.has(coord.global_adapter.digest)
    base = coord.global_adapter.tensors
    nodes = {i: (lambda s, i=i: s.envelope(make_update(base, "ffa", rng), examples=20)) for i in (1, 2)}
    grid = Grid(coord.cfg, base, nodes)
    row = coord.run_round(grid, 1, [1, 2])
    assert row.status == "aggregated"
    stored = decode_tensors(coord.store.blobs.get(row.adapter_digest), max_bytes=1 << 24)
    assert all(np.array_equal(t, round_tensors({"x": t}, "bfloat16")["x"]) for t in stored.values())
    assert coord.global_adapter.digest == row.adapter_digest
