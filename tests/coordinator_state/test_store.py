"""The SQLite store and the content-addressed blobs."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loracommons.coordinator.blobs import BlobCorrupt, BlobStore
from loracommons.coordinator.schema import volunteers
from loracommons.coordinator.store import Store, StoreError
from loracommons.protocol.identity import SigningKey

from . import volunteer_fp


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "proj")
    yield s
    s.close()


def test_database_is_wal_and_persists(tmp_path: Path):
    store = Store(tmp_path)
    key = SigningKey.generate().public
    store.register_volunteer(key, "alice")
    store.close()
    mode = sqlite3.connect(tmp_path / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again = Store(tmp_path)
    assert again.volunteer(key.fingerprint).display_name == "alice"
    assert again.registered_fingerprints() == {key.fingerprint}
    again.close()


def test_register_updates_name_and_refuses_coordinator_keys(store: Store):
    key = SigningKey.generate().public
    first = store.register_volunteer(key.openssh, "alice")
    assert first.registered and not first.banned and first.public_key == key.openssh
    assert store.register_volunteer(key, "alice2").display_name == "alice2"
    assert store.register_volunteer(key).display_name == "alice2"
    assert store.registered_public_keys() == [key.openssh]
    with pytest.raises(StoreError, match="ecdsa"):
        store.register_volunteer(SigningKey.generate("coordinator").public)


def test_ban_by_unique_prefix_with_dashes(store: Store):
    key = SigningKey.generate().public
    store.register_volunteer(key, "bob")
    assert store.ban(key.short) == key.fingerprint  # `3f2a-91bc-...` form
    assert store.banned_fingerprints() == {key.fingerprint}
    assert store.registered_fingerprints() == set()
    assert store.unban(key.fingerprint[:8]) == key.fingerprint
    assert store.banned_fingerprints() == set()


def test_ban_ambiguous_unknown_and_ahead_of_time(store: Store):
    store.open_round(1, "n", base_version=0)
    a, b = "abcd" + "0" * 60, "abcd" + "1" * 60
    store.record_update(1, a, "admitted")
    store.record_update(1, b, "admitted")
    with pytest.raises(StoreError, match="ambiguous"):
        store.ban("abcd")
    with pytest.raises(StoreError, match="no known volunteer"):
        store.ban("ffff0000")
    with pytest.raises(StoreError, match="too short"):
        store.ban("ab")
    with pytest.raises(StoreError, match="not a hex fingerprint"):
        store.ban("not-hex!")
    assert store.ban("abcd1") == b
    never_seen = "ee" * 32
    assert store.ban(never_seen) == never_seen
    assert store.banned_fingerprints() == {b, never_seen}


def test_round_lifecycle_credits_contributors_once(store: Store):
    store.open_round(1, "nonce1", base_version=0, sampled=4, base_adapter_digest="0" * 64)
    store.record_update(1, volunteer_fp(1), "admitted", examples=300, train_loss=1.0, nbytes=10,
                        update_digest="1" * 64)
    store.record_update(1, volunteer_fp(2), "admitted", examples=100, train_loss=3.0)
    store.record_update(1, volunteer_fp(3), "rejected", reason="bad_signature", message="nope")
    store.record_update(1, None, "rejected", reason="malformed")
    assert store.has_admitted(1, volunteer_fp(1)) and not store.has_admitted(1, volunteer_fp(3))
    closed = store.close_round(1, "aggregated", eval_loss=2.2, adapter_digest="a" * 64, note="ok")
    assert (closed.admitted, closed.rejected) == (2, 2)
    assert closed.train_loss == pytest.approx((300 * 1.0 + 100 * 3.0) / 400)
    assert closed.eval_loss == 2.2 and closed.status == "aggregated" and closed.closed
    # Closing again (a resumed coordinator repeating itself) changes nothing.
    assert store.close_round(1, "aggregated") == closed
    board = store.leaderboard()
    assert [(v.fingerprint, v.rounds_contributed, v.examples_contributed) for v in board] == [
        (volunteer_fp(1), 1, 300), (volunteer_fp(2), 1, 100)]
    with pytest.raises(StoreError, match="already closed as aggregated"):
        store.close_round(1, "skipped")
    with pytest.raises(StoreError, match="not open"):
        store.record_update(1, volunteer_fp(4), "admitted")
    with pytest.raises(StoreError, match="already closed"):
        store.open_round(1, "again", base_version=0)
    assert store.last_closed_round() == 1 and store.current_round() is None
    assert store.last_aggregated_round().adapter_digest == "a" * 64


def test_rejection_at_aggregation_time_is_recorded_and_not_credited(store: Store):
    store.open_round(1, "n", base_version=0)
    store.record_update(1, volunteer_fp(1), "admitted", examples=10, train_loss=1.0, update_digest="1" * 64)
    store.record_update(1, volunteer_fp(2), "admitted", examples=10, train_loss=9.0, update_digest="2" * 64)
    store.reject_admitted(1, "2" * 64, "krum", "dropped by Multi-Krum")
    with pytest.raises(StoreError, match="no admitted update"):
        store.reject_admitted(1, "2" * 64, "krum")
    row = store.close_round(1, "aggregated")
    assert (row.admitted, row.rejected, row.train_loss) == (1, 1, 1.0)
    assert [v.fingerprint for v in store.leaderboard()] == [volunteer_fp(1)]
    assert store.status().updates.rejected_by_reason == {"krum": 1}
    with pytest.raises(StoreError, match="not open"):
        store.reject_admitted(1, "1" * 64, "krum")


def test_skipped_round_credits_nobody(store: Store):
    store.open_round(1, "n", base_version=0)
    store.record_update(1, volunteer_fp(1), "admitted", examples=5)
    row = store.close_round(1, "skipped", note="1 admitted, need 2")
    assert row.note == "1 admitted, need 2" and row.admitted == 1
    assert store.leaderboard() == []


def test_reopening_an_interrupted_round_drops_its_updates(store: Store):
    store.open_round(1, "n", base_version=0)
    store.close_round(1, "aggregated")
    store.open_round(2, "first-try", base_version=1)
    store.record_update(2, volunteer_fp(1), "admitted", examples=7)
    assert store.current_round().round == 2
    # The coordinator was killed; on restart it runs round 2 again with a new nonce.
    again = store.open_round(2, "second-try", base_version=1, sampled=2)
    assert again.nonce == "second-try" and store.round_updates(2) == []
    store.record_update(2, volunteer_fp(1), "admitted", examples=7)
    store.close_round(2, "aggregated")
    assert store.leaderboard()[0].examples_contributed == 7
    with pytest.raises(StoreError, match="not after the last closed round"):
        store.open_round(0, "x", base_version=0)


@pytest.mark.parametrize(("args", "message"), [
    ((1, volunteer_fp(1), "maybe"), "outcome must be"),
    ((1, volunteer_fp(1), "rejected"), "needs a reason"),
    ((1, "12345", "admitted"), "not 64 hex"),
    ((7, volunteer_fp(1), "admitted"), "round 7 is not open"),
])
def test_record_update_refuses_bad_input(store: Store, args, message):
    store.open_round(1, "n", base_version=0)
    with pytest.raises(StoreError, match=message):
        store.record_update(*args)


def test_write_is_one_transaction(store: Store):
    with pytest.raises(RuntimeError):
        with store._write() as conn:
            conn.execute(volunteers.insert().values(fingerprint="cd" * 32, registered=True, banned=False,
                                                    first_seen="now"))
            raise RuntimeError("crash in the middle")
    assert store.volunteer("cd" * 32) is None


def test_releases_are_consecutive_and_idempotent(store: Store):
    assert store.next_release_version() == 1 and store.latest_release() is None
    store.add_release(1, 1, "1" * 64, created="t", path="releases/v1")
    assert store.add_release(1, 1, "1" * 64, created="t", path="releases/v1").version == 1
    with pytest.raises(StoreError, match="another manifest"):
        store.add_release(1, 1, "2" * 64, created="t", path="releases/v1")
    with pytest.raises(StoreError, match="does not follow"):
        store.add_release(3, 3, "3" * 64, created="t", path="releases/v3")
    store.add_release(2, 4, "2" * 64, created="t", path="releases/v2")
    assert [r.version for r in store.releases()] == [1, 2]
    assert store.latest_release().round == 4 and store.next_release_version() == 3


def test_unreleased_aggregate_after_crash_before_publish(store: Store):
    store.open_round(1, "n", base_version=0)
    store.close_round(1, "aggregated", adapter_digest="a" * 64)
    store.add_release(1, 1, "1" * 64, created="t", path="releases/v1")
    assert store.unreleased_aggregate() is None
    store.open_round(2, "n", base_version=1)
    store.close_round(2, "aggregated", adapter_digest="b" * 64)
    assert store.unreleased_aggregate().adapter_digest == "b" * 64


def test_status_dict(store: Store):
    key = SigningKey.generate().public
    store.register_volunteer(key, "alice")
    store.open_round(1, "n", base_version=0, sampled=3)
    store.record_update(1, key.fingerprint, "admitted", examples=10, train_loss=1.5)
    store.record_update(1, volunteer_fp(9), "rejected", reason="wrong_nonce")
    store.record_update(1, None, "rejected", reason="malformed")
    store.close_round(1, "aggregated", eval_loss=1.7)
    store.add_release(1, 1, "1" * 64, created="2026-01-01T00:00:00Z", path="releases/v1")
    store.open_round(2, "n2", base_version=1)
    store.record_update(2, volunteer_fp(9), "rejected", reason="wrong_nonce")
    store.ban(volunteer_fp(9))
    typed = store.status()
    assert (typed.updates.rejected, typed.rounds.open, typed.latest_release.version) == (3, 2, 1)
    status = typed.to_json()  # what `coordinator status --json` prints
    assert status["rounds"] == {"total": 2, "last_closed": 1, "open": 2,
                                "by_status": {"open": 1, "aggregated": 1, "skipped": 0, "failed": 0}}
    assert status["volunteers"] == {"known": 2, "registered": 1, "banned": 1, "contributed": 1}
    assert status["updates"] == {"admitted": 1, "rejected": 3,
                                 "rejected_by_reason": {"malformed": 1, "wrong_nonce": 2}}
    assert status["latest_release"]["version"] == 1
    assert [r["round"] for r in status["recent_rounds"]] == [1, 2]
    assert status["recent_rounds"][0]["train_loss"] == 1.5
    assert set(status["recent_rounds"][0]) == {"round", "status", "started", "closed", "sampled", "admitted",
                                               "rejected", "train_loss", "eval_loss", "note"}
    assert [(u["round"], u["outcome"], u["reason"]) for u in status["recent_updates"]] == [
        (1, "admitted", ""), (1, "rejected", "wrong_nonce"), (1, "rejected", "malformed"),
        (2, "rejected", "wrong_nonce")]
    assert set(status["recent_updates"][0]) == {"round", "fingerprint", "outcome", "reason", "message",
                                                "examples", "update_digest", "staleness"}


def test_blobs_roundtrip_and_detect_corruption(tmp_path: Path):
    blobs = BlobStore(tmp_path / "blobs")
    data = os.urandom(1000)
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert blobs.path(digest) == tmp_path / "blobs" / "sha256" / digest
    assert blobs.put(data) == digest and blobs.get(digest) == data
    blobs.path(digest).write_bytes(data[:-1] + b"x")
    with pytest.raises(BlobCorrupt, match="corrupt"):
        blobs.get(digest)
    assert blobs.put(data) == digest and blobs.get(digest) == data  # putting it again repairs it
    for bad in ("../state.db", "A" * 64, "00"):
        with pytest.raises(StoreError, match="not a sha256"):
            blobs.get(bad)
    with pytest.raises(StoreError, match="no blob"):
        blobs.get("0" * 64)


_WRITER = textwrap.dedent("""
    import os, sys
    from loracommons.coordinator.blobs import BlobStore
    blobs = BlobStore(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        blobs.put(i.to_bytes(8, "little") * (1 << 19))   # 4 MiB, each distinct
        i += 1
""")


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_blobs_survive_kill_9(tmp_path: Path, delay: float):
    root = tmp_path / "blobs"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30  # under load the first 4 MiB put can take longer than `delay`
        while not any(p.name[:1] != "." for p in (root / "sha256").glob("*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # then the kill lands at some point of a later put
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    blobs = BlobStore(root)  # a restart cleans what the killed writer left
    names = sorted(p.name for p in (root / "sha256").iterdir())
    assert names and all(not n.startswith(".tmp") for n in names)
    for name in names:  # every final name holds its whole content
        assert blobs.get(name)
