"""The app-bundle check a node runs before any task, and the round's message layout."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

from loracommons import __version__
from loracommons.protocol.errors import Malformed, ProtocolError, TooLarge
from loracommons.protocol.flower_app import (
    APP_NAME,
    APP_PUBLISHER,
    MAX_FAB_BYTES,
    ForeignApp,
    app_pyproject,
    check_fab,
    envelope_content,
    read_envelope,
    read_task,
    task_content,
)

FAB_ID = f"{APP_PUBLISHER}/{APP_NAME}"
LIMIT = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def genuine() -> bytes:
    from loracommons.coordinator.superlink import fab_bytes

    return fab_bytes()


def build(files: dict[str, bytes]) -> bytes:
    """A FAB as `flwr build` / `flwr run` make them (pyproject re-serialized, .info/CONTENT added)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(files)[0]


def raw_zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as bundle:
        for name, data in members:
            bundle.writestr(name, data)
    return buf.getvalue()


def refuse(content: bytes, match: str, fab_id: str = FAB_ID, fab_version: str = __version__,
           claimed: str | None = None) -> ForeignApp:
    with pytest.raises(ForeignApp, match=match) as info:
        check_fab(content, claimed or sha(content), fab_id, fab_version, __version__)
    assert info.value.reason == "foreign_app"
    return info.value


def test_accepts_the_genuine_bundle(genuine):
    check_fab(genuine, sha(genuine), FAB_ID, __version__, __version__)
    assert set(zipfile.ZipFile(io.BytesIO(genuine)).namelist()) == {"pyproject.toml", ".info/CONTENT"}


def test_accepts_the_same_pyproject_zipped_differently(genuine):
    """Parsed, not byte, comparison: another zip tool or TOML writer gives another sha256."""
    text = app_pyproject(__version__).encode()
    for bundle in (build({"pyproject.toml": text}),
                   raw_zip([(".info/CONTENT", b""), ("pyproject.toml", text)], zipfile.ZIP_STORED)):
        check_fab(bundle, sha(bundle), FAB_ID, __version__, __version__)
    assert raw_zip([("pyproject.toml", text)]) != genuine


def test_refuses_bytes_that_do_not_match_their_hash(genuine):
    tampered = bytearray(genuine)
    tampered[len(tampered) // 2] ^= 0x01
    refuse(bytes(tampered), "does not match its announced sha256", claimed=sha(genuine))
    refuse(genuine, "does not match its announced sha256", claimed="0" * 64)


def test_refuses_corrupted_bytes_with_a_matching_hash(genuine):
    refuse(genuine[: len(genuine) // 2], "unreadable")  # truncated: no central directory
    corrupted = bytearray(genuine)
    start = genuine.index(b"[build-system]")  # Flower stores members uncompressed
    corrupted[start:start + 8] = b"\xff" * 8  # member data that fails its CRC or inflation
    refuse(bytes(corrupted), "unreadable")


@pytest.mark.parametrize("fab_id", ["someone/loracommons-app", "loracommons/other-app", "", FAB_ID + "x"])
def test_refuses_another_app_id(genuine, fab_id):
    refuse(genuine, "this node runs loracommons/loracommons-app", fab_id=fab_id)


def test_refuses_another_version(genuine):
    refuse(genuine, "this node runs", fab_version="0.0.0-other")
    other = build({"pyproject.toml": app_pyproject("9.9.9").encode()})
    refuse(other, "this node runs", fab_version="9.9.9")
    # a bundle whose pyproject says another version than the run claims
    with pytest.raises(ForeignApp, match="differs from the installed"):
        check_fab(other, sha(other), FAB_ID, __version__, __version__)


@pytest.mark.parametrize("extra", [
    "loracommons/client/client_app.py",  # shadows the installed module (Flower puts the app dir first)
    "loracommons/__init__.py",
    "README.md",
    "sitecustomize.py",
    "../pyproject.toml",
])
def test_refuses_any_extra_file(extra):
    text = app_pyproject(__version__).encode()
    if extra.startswith(".."):  # not something `flwr build` makes; a hand-made zip can carry anything
        bundle = raw_zip([("pyproject.toml", text), (".info/CONTENT", b""), (extra, b"x")])
    else:
        bundle = build({"pyproject.toml": text, extra: b"open('/tmp/x', 'w')\n"})
        assert extra in zipfile.ZipFile(io.BytesIO(bundle)).namelist()
    refuse(bundle, "carries files this node did not install")


def test_refuses_a_bundle_lacking_its_pyproject():
    refuse(raw_zip([(".info/CONTENT", b"")]), r"lacks \['pyproject.toml'\]")


@pytest.mark.parametrize("old,new", [
    ('clientapp = "loracommons.client.client_app:app"', 'clientapp = "evil.client_app:app"'),
    ('serverapp = "loracommons.coordinator.server_app:app"', 'serverapp = "evil.server_app:app"'),
    ('project-dir = ""', 'project-dir = "/etc"'),
    ('project-dir = ""', 'project-dir = ""\nshell = "rm -rf ~"'),
    ("dependencies = []", 'dependencies = ["evil-package>=1"]'),
    ('requires = ["hatchling"]', 'requires = ["hatchling", "evil"]'),
    ('publisher = "loracommons"', 'publisher = "loracommons"\nlicense-file = "x"'),
])
def test_refuses_a_changed_pyproject(old, new):
    text = app_pyproject(__version__)
    assert old in text
    bundle = build({"pyproject.toml": text.replace(old, new).encode()})
    refuse(bundle, "differs from the installed loracommons app")


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04" + b"\x00" * 40])
def test_refuses_what_is_not_a_zip(content):
    refuse(content, "unreadable")


def test_refuses_unparsable_pyproject():
    for text in (b"\xff\xfe not utf-8", b"[project\nname = 1"):
        refuse(raw_zip([("pyproject.toml", text), (".info/CONTENT", b"")]), "unreadable")


def test_refuses_oversize_bundles_before_hashing():
    big = b"\x00" * (MAX_FAB_BYTES + 1)
    refuse(big, "bytes; ours is a few hundred", claimed="not even a hash")


def test_refuses_a_zip_bomb_pyproject():
    """A small zip whose pyproject.toml would inflate past the limit is not read."""
    bomb = app_pyproject(__version__) + "#" * (1 << 20) + "\n"
    bundle = raw_zip([("pyproject.toml", bomb.encode()), (".info/CONTENT", b"")])
    assert len(bundle) < MAX_FAB_BYTES
    refuse(bundle, "too large")


# --------------------------------------------------------------- message layout


def roundtrip(content):  # noqa: ANN001, ANN201
    """Through Flower's wire format, as a node or the coordinator receives it."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    return recorddict_from_proto(recorddict_to_proto(content))


def test_task_and_envelope_roundtrip():
    adapter, task = bytes(range(256)) * 40, b'{"round": 1}'
    got = read_task(roundtrip(task_content(task, adapter, {"outcome": "admitted", "round": 0})))
    assert got == (task, adapter, {"outcome": "admitted", "round": 0})
    assert read_task(roundtrip(task_content(task, b"")))[2] == {}
    manifest, payload, signature = b'{"m": 1}', b"\x00\x01" * 5000, b"sig"
    assert read_envelope(roundtrip(envelope_content(manifest, payload, signature)), LIMIT) == (
        manifest, payload, signature)
    packed = roundtrip(envelope_content(manifest, payload, signature, itemsize=2))
    assert packed["lc"]["encoding"] == "shuffle2-zlib"
    assert len(packed["lc"]["payload"]) < len(payload) // 10
    assert read_envelope(packed, LIMIT) == (manifest, payload, signature)
    with pytest.raises(TooLarge):  # the limit holds before inflating past it
        read_envelope(packed, len(payload) - 1)


def test_an_unknown_or_broken_encoding_is_refused():
    from flwr.app import ConfigRecord, RecordDict

    content = envelope_content(b"{}", b"\x00\x01" * 500, b"sig", itemsize=2)
    lc = {"manifest": b"{}", "signature": b"sig"}
    for encoding, error in (("gzip", Malformed), (3, ProtocolError), ("shuffle4-zlib", Malformed)):
        bad = RecordDict({**content, "lc": ConfigRecord({**lc, "encoding": encoding})})
        bad["lc"]["payload"] = content["lc"]["payload"]
        if encoding == "shuffle4-zlib":  # a known encoding over bytes that are not its stream
            bad["lc"]["payload"] = b"not zlib"
        with pytest.raises(error):
            read_envelope(roundtrip(bad), LIMIT)


def test_small_blobs_travel_inline_and_large_ones_in_chunks(monkeypatch):
    """A record is one object per hop: a round's small adapter and payload go inline in a
    ConfigRecord; past INLINE_BYTES they go as a chunked raw Array, and both forms read back."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from loracommons.protocol import flower_app

    task, adapter, payload = b"{}", b"\x01" * 3000, b"\x02" * 3000
    small_task, small_reply = task_content(task, adapter), envelope_content(b"{}", payload, b"sig")
    assert isinstance(small_task["lc-adapter"], ConfigRecord) and set(small_reply) == {"lc"}
    assert len(get_all_nested_objects(small_task)) == 3  # RecordDict and two ConfigRecords
    assert len(get_all_nested_objects(small_reply)) == 2
    monkeypatch.setattr(flower_app, "INLINE_BYTES", 1000)
    large_task, large_reply = task_content(task, adapter), envelope_content(b"{}", payload, b"sig")
    assert isinstance(large_task["lc-adapter"], ArrayRecord) and "payload" not in large_reply["lc"]
    for content in (small_task, large_task):
        assert read_task(roundtrip(content))[1] == adapter
    for content in (small_reply, large_reply):
        assert read_envelope(roundtrip(content), LIMIT)[1] == payload


def test_a_bad_note_is_dropped_not_fatal():
    from flwr.app import ConfigRecord

    for note in (b"not json", b"[1, 2]", b'"text"', b"{" + b" " * 5000 + b"}"):
        content = task_content(b"{}", b"adapter")
        content["lc"] = ConfigRecord({"task": b"{}", "note": note})
        assert read_task(content) == (b"{}", b"adapter", {})


def _malformed_tasks():
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    good = {"lc": ConfigRecord({"task": b"{}", "note": b"{}"}),
            "lc-adapter": ArrayRecord({"adapter": Array("uint8", (3,), "raw", b"abc")})}
    floats = np.zeros(3, dtype=np.float32)
    return [
        RecordDict(),
        RecordDict({"lc-adapter": good["lc-adapter"]}),
        RecordDict({"lc": good["lc"]}),
        RecordDict({**good, "lc": ConfigRecord({"note": b"{}"})}),
        RecordDict({**good, "lc": ConfigRecord({"task": "a str, not bytes"})}),
        RecordDict({**good, "lc": ConfigRecord({"task": b"{}", "note": 5})}),
        RecordDict({**good, "lc": MetricRecord({"task": 1.0})}),
        RecordDict({**good, "lc-adapter": ArrayRecord({"other": Array("uint8", (3,), "raw", b"abc")})}),
        RecordDict({**good, "lc-adapter": ArrayRecord({"adapter": Array(floats)})}),
        RecordDict({**good, "lc-adapter": ArrayRecord({"adapter": Array("uint8", (1, 3), "raw", b"abc")})}),
        RecordDict({**good, "lc-adapter": ArrayRecord({"adapter": Array("uint8", (3,), "numpy.ndarray",
                                                                        b"abc")})}),
        RecordDict({**good, "lc-adapter": ConfigRecord({"adapter": "a str, not bytes"})}),
        RecordDict({**good, "lc-adapter": ConfigRecord({"other": b"abc"})}),
    ]


@pytest.mark.parametrize("index", range(13))
def test_read_task_refuses_malformed_records(index):
    content = _malformed_tasks()[index]
    with pytest.raises(ProtocolError):
        read_task(content)
    with pytest.raises(ProtocolError):
        read_task(roundtrip(content))


def _malformed_replies():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    lc = {"manifest": b"{}", "signature": b"sig"}
    good = {"lc": ConfigRecord(lc),  # the large form: the payload in its own record
            "lc-payload": ArrayRecord({"payload": Array("uint8", (7,), "raw", b"payload")})}
    return [
        RecordDict(),
        RecordDict({"lc": good["lc"]}),
        RecordDict({"lc-payload": good["lc-payload"]}),
        RecordDict({**good, "lc": ConfigRecord({"manifest": b"{}"})}),
        RecordDict({**good, "lc": ConfigRecord({"signature": b"sig"})}),
        RecordDict({**good, "lc": ConfigRecord({**lc, "manifest": "str"})}),
        RecordDict({**good, "lc": ConfigRecord({**lc, "signature": 7})}),
        RecordDict({**good, "lc-payload": ArrayRecord({"payload": Array(np.ones(2, dtype=np.float32))})}),
        RecordDict({**good, "lc-payload": ArrayRecord({"payload": Array(np.ones((2, 2), dtype=np.uint8))})}),
        RecordDict({**good, "lc-payload": ArrayRecord({"blob": Array("uint8", (1,), "raw", b"x")})}),
        RecordDict({"lc": ConfigRecord({**lc, "payload": "a str, not bytes"})}),
        RecordDict({"lc": ConfigRecord({**lc, "payload": [1, 2]})}),
        RecordDict({**good, "lc": ConfigRecord({**lc, "payload": b"payload"})}),  # the payload twice
    ]


@pytest.mark.parametrize("index", range(13))
def test_read_envelope_refuses_malformed_records(index):
    content = _malformed_replies()[index]
    with pytest.raises(ProtocolError):
        read_envelope(content, LIMIT)
    with pytest.raises(ProtocolError):
        read_envelope(roundtrip(content), LIMIT)


def test_readers_refuse_what_is_not_a_record_dict():
    for content in (None, 42, b"bytes", {"lc": "x"}):
        with pytest.raises(ProtocolError):
            read_task(content)
        with pytest.raises(ProtocolError):
            read_envelope(content, LIMIT)


def test_retry_invoker_gives_up_when_stopped():
    """A node's runner must not spend its shutdown retrying a SuperNode it just stopped."""
    import threading
    import time

    import httpx

    from loracommons.protocol.flower_runtime import safe_retry_invoker

    stop = threading.Event()
    calls: list[float] = []

    def unreachable(stop_at: int = 0):  # noqa: ANN202
        calls.append(time.monotonic())
        if len(calls) == stop_at:
            stop.set()
        raise httpx.ConnectError("connection refused")

    # set between two tries: the next failure is final
    with pytest.raises(httpx.ConnectError):
        safe_retry_invoker(max_time=60.0, stop=stop).invoke(unreachable, 3)
    assert len(calls) == 3
    # set while it waits for the next try: the wait ends at once
    stop.clear()
    calls.clear()
    stopped_at: list[float] = []

    def stop_now() -> None:
        stopped_at.append(time.monotonic())
        stop.set()

    threading.Timer(0.2, stop_now).start()
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        safe_retry_invoker(max_time=60.0, stop=stop).invoke(unreachable)
    # the jittered back-off may try a few times in 0.2 s; after the stop, one try at most
    assert time.monotonic() - started < 3 and sum(t >= stopped_at[0] for t in calls) <= 1
    # without a stop, other HTTP errors are still not retried
    calls.clear()

    def refused():  # noqa: ANN202
        calls.append(time.monotonic())
        httpx.Response(401, request=httpx.Request("POST", "http://127.0.0.1/")).raise_for_status()

    with pytest.raises(httpx.HTTPStatusError):
        safe_retry_invoker(max_time=60.0).invoke(refused)
    assert len(calls) == 1
