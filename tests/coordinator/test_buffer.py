"""The async buffer (issue 13): crafted updates against real store rows, and the exact stale fold."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from loracommons.coordinator.buffer import Buffer
from loracommons.coordinator.config import ConfigError, ProjectConfig, staleness_factor
from loracommons.coordinator.store import Store, new_nonce
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.errors import Reason
from loracommons.protocol.identity import SigningKey

from .conftest import Signer, make_global, make_update


def decode(payload: bytes) -> dict:
    return decode_tensors(payload, max_bytes=1 << 24)


def async_cfg(**round_keys) -> ProjectConfig:
    return ProjectConfig.from_dict({"round": {"schedule": "async", "buffer_size": 2, "max_staleness": 2,
                                              "min_volunteers": 1, **round_keys}})


class World:
    """A store with versions opened and closed by hand, and tasks recorded on them."""

    def __init__(self, tmp_path, rng, **round_keys):
        self.cfg, self.rng = async_cfg(**round_keys), rng
        self.store = Store(tmp_path)
        self.adapters = {0: make_global(rng)}
        self.digests = {0: self.store.blobs.put(encode_tensors(self.adapters[0]))}
        self.version = 0
        self.open_next()

    def open_next(self) -> None:
        """Close the open version (if any) with a new adapter, open the next one."""
        if self.version:
            g = {n: (t + 0.1 * self.rng.normal(size=t.shape)).astype(np.float32) if ".lora_B." in n else t
                 for n, t in self.adapters[self.version - 1].items()}
            self.adapters[self.version] = g
            self.digests[self.version] = digest = self.store.blobs.put(encode_tensors(g))
            self.store.close_round(self.version, "aggregated", adapter_digest=digest)
        self.version += 1
        self.store.open_round(self.version, new_nonce(), base_version=0,
                              base_adapter_digest=self.digests[self.version - 1])

    def task(self):
        return self.store.record_task(new_nonce(), self.version, 2**64 - 7, self.digests[self.version - 1])

    def update(self, task, key=None, step=0.05, **claims):
        base = self.adapters[task.base_version]
        signer = Signer(self.cfg, base, round=task.serial, nonce=task.nonce)
        return signer.envelope(make_update(base, "ffa", self.rng, step), key=key or SigningKey.generate(),
                               examples=10, **claims)

    def buffer(self) -> Buffer:
        g = self.adapters[self.version - 1]
        return Buffer(self.cfg, self.version, g, self.digests[self.version - 1], "ab" * 16,
                      tasks=self.store.task, last_serial=self.store.last_task_serial,
                      bases=self.base)

    def base(self, digest: str):
        return next((self.adapters[v] for v, x in self.digests.items() if x == digest), None)


@pytest.fixture
def world(tmp_path, rng):
    w = World(tmp_path, rng)
    yield w
    w.store.close()


def test_fresh_updates_fold_as_the_plain_mean_of_b(world):
    tasks = [world.task(), world.task()]
    envelopes = [world.update(t) for t in tasks]
    buf = world.buffer()
    records = [buf.offer(e) for e in envelopes]
    assert [r.accepted for r in records] == [True, True] and [r.staleness for r in records] == [0, 0]
    assert buf.admitted == 2
    result = buf.close()
    sent = [decode(e.payload) for e in envelopes]
    for name in sent[0]:
        np.testing.assert_allclose(result.tensors[name], (sent[0][name] + sent[1][name]) / 2, atol=1e-6)


def test_a_stale_update_folds_its_own_delta_weighted_by_staleness(world):
    old = world.task()  # trains from version 0 while version 1 is open
    stale = world.update(old)
    world.open_next()  # version 1 closes: the update is now one version behind
    fresh = world.update(world.task())
    buf = world.buffer()
    records = [buf.offer(stale), buf.offer(fresh)]
    assert [r.accepted for r in records] == [True, True], [r.message for r in records]
    assert [r.staleness for r in records] == [1, 0]
    s = staleness_factor(world.cfg, 1)
    assert s == pytest.approx(1 / np.sqrt(2))
    assert records[0].weight == pytest.approx(s * records[1].weight)  # same examples, weighted down
    result = buf.close()
    x_stale, x_fresh = decode(stale.payload), decode(fresh.payload)
    base, now = world.adapters[0], world.adapters[1]
    for name in x_stale:  # G + (s (X_s - X_base) + (X_f - G)) / (s + 1)
        want = now[name] + (s * (x_stale[name] - base[name]) + (x_fresh[name] - now[name])) / (s + 1)
        np.testing.assert_allclose(result.tensors[name], want, atol=1e-6)
    for name in now:  # A is frozen in ffa
        if ".lora_A." in name:
            np.testing.assert_array_equal(result.tensors[name], now[name])


def test_a_buffer_of_equally_stale_updates_moves_as_far_as_a_fresh_one(world):
    """s(tau) weighs updates against each other in a version; it does not shrink the version's step."""
    stale = world.update(world.task())
    world.open_next()
    buf = world.buffer()
    assert buf.offer(stale).staleness == 1
    result = buf.close()
    sent, base, now = decode(stale.payload), world.adapters[0], world.adapters[1]
    for name in sent:
        np.testing.assert_allclose(result.tensors[name], now[name] + (sent[name] - base[name]), atol=1e-6)


def test_a_versions_federated_eval_counts_only_updates_trained_from_its_base(world):
    """Issue 16 in async: a stale update evaluated an older version; its claim is not this one's."""
    old = world.task()
    stale = world.update(old, train_loss=1.0, eval_loss=9.0, eval_tokens=100)
    world.open_next()
    fresh = [world.update(world.task(), train_loss=1.0, eval_loss=x, eval_tokens=100) for x in (2.0, 3.0)]
    buf = world.buffer()
    assert all(buf.offer(e).accepted for e in [stale, *fresh])
    assert buf.close().eval_loss == pytest.approx(2.5)  # the median of 2 and 3; 9 scored version 0


def test_beyond_max_staleness_is_refused_as_stale(world):
    old = world.task()
    envelope = world.update(old)
    for _ in range(3):
        world.open_next()  # 3 versions behind, max_staleness 2
    record = world.buffer().offer(envelope)
    assert (record.accepted, record.reason, record.staleness) == (False, Reason.STALE, 3)
    assert "max_staleness 2" in record.message


def test_a_replayed_update_is_refused(world):
    task = world.task()
    envelope = world.update(task)
    buf = world.buffer()
    first = buf.offer(envelope)
    assert first.accepted
    assert buf.offer(envelope).reason == Reason.REPLAYED  # in the same buffer
    world.store.record_update(world.version, first.signer, "admitted", **first.store_fields(),
                              task_nonce=task.nonce)
    world.open_next()
    assert world.buffer().offer(envelope).reason == Reason.REPLAYED  # into a later version


def test_restoring_admits_the_recorded_update_again_once(tmp_path, rng):
    w = World(tmp_path, rng)
    task = w.task()
    envelope = w.update(task)
    record = w.buffer().offer(envelope)
    w.store.record_update(1, record.signer, "admitted", **record.store_fields(), task_nonce=task.nonce)
    rebuilt = w.buffer()
    assert rebuilt.offer(envelope, restoring=True).accepted
    assert rebuilt.offer(envelope, restoring=True).reason == Reason.REPLAYED
    assert w.buffer().offer(envelope).reason == Reason.REPLAYED  # only the rebuild may take it
    w.store.close()


def test_a_base_from_the_future_is_refused(world):
    task = world.task()
    envelope = world.update(task, round=task.serial + 5)
    record = world.buffer().offer(envelope)
    assert (record.accepted, record.reason) == (False, Reason.FUTURE_BASE), record.message


def test_another_projects_update_is_refused(world):
    task = world.task()
    record = world.buffer().offer(world.update(task, project_id="another-project"))
    assert (record.accepted, record.reason) == (False, Reason.WRONG_PROJECT)


def test_an_unknown_nonce_or_base_is_refused(world):
    task = world.task()
    assert world.buffer().offer(world.update(task, nonce="cd" * 16)).reason == Reason.WRONG_NONCE
    other = world.update(task, base_adapter_digest="00" * 32)
    assert world.buffer().offer(other).reason == Reason.WRONG_BASE


def test_an_expired_task_is_refused_as_late(world):
    task = world.task()
    world.store.expire_tasks([task.nonce])
    assert world.buffer().offer(world.update(task)).reason == Reason.LATE


def test_one_key_may_send_one_update_per_task(world):
    key = SigningKey.generate()
    buf = world.buffer()
    assert all(buf.offer(world.update(world.task(), key=key)).accepted for _ in range(2))
    assert buf.close().tensors is not None


@pytest.mark.parametrize(("section", "values", "words"), [
    ("aggregation", {"mode": "exact"}, "rank 2r"),
    ("privacy", {"dp": True}, "accountant"),
    ("round", {"min_volunteers": 3}, "buffer_size"),
])
def test_async_refuses_what_it_cannot_do(section, values, words):
    obj = {"round": {"schedule": "async", "buffer_size": 2, "min_volunteers": 1, "volunteers_per_round": 3}}
    obj.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=words):
        ProjectConfig.from_dict(obj)


def test_staleness_weights():
    assert staleness_factor(async_cfg(staleness_weight="constant"), 5) == 1.0
    assert staleness_factor(async_cfg(staleness_weight="inverse"), 3) == 0.25
    assert staleness_factor(async_cfg(), 0) == 1.0


def test_an_older_state_db_gains_the_new_columns(tmp_path):
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY, round INTEGER NOT NULL, "
                     "fingerprint VARCHAR(64), update_digest VARCHAR(64), outcome VARCHAR(16) NOT NULL, "
                     "reason VARCHAR(64) NOT NULL, message TEXT NOT NULL, examples INTEGER NOT NULL, "
                     "train_loss FLOAT, bytes INTEGER NOT NULL, received VARCHAR(32) NOT NULL)")
    store = Store(tmp_path)
    try:
        store.open_round(1, new_nonce(), base_version=0)
        store.record_update(1, None, "rejected", reason="malformed", staleness=2)
        assert store.round_updates(1)[0].staleness == 2
    finally:
        store.close()
