"""The one Flower app a LoRA Commons node will run, defined as data.

Flower ships app code to nodes as a FAB (a zip). Ours holds no code: only a
`pyproject.toml` whose components name modules of the *installed* loracommons
package. A coordinator sends this FAB with run-config overrides; a volunteer's
node accepts a run only if the FAB holds exactly these files with this content
(`check_fab`), and then calls its own installed ClientApp, so nothing from the
coordinator is ever imported or executed. Pure Python: no flwr needed to check; the
messages are built and read with Flower's public records, imported only when called.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile

from loracommons.protocol import wire
from loracommons.protocol.canonical import parse_json
from loracommons.protocol.errors import ProtocolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

APP_PUBLISHER = "loracommons"
APP_NAME = "loracommons-app"
MAX_FAB_BYTES = 1 << 20
MAX_NOTE_BYTES = 4096  # the outcome of a volunteer's previous update; longer ones are dropped
FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})
SERVER_APP = "loracommons.coordinator.server_app:app"
CLIENT_APP = "loracommons.client.client_app:app"
"""The installed apps, as the bundle names them (module:object)."""


class ForeignApp(ProtocolError):
    """The run's app is not the one this installed loracommons defines."""

    reason = "foreign_app"


def app_pyproject(version: str, *, name: str = APP_NAME, publisher: str = APP_PUBLISHER,
                  serverapp: str = SERVER_APP, clientapp: str = CLIENT_APP,
                  description: str = "LoRA Commons federated app: references installed loracommons code only",
                  ) -> str:
    """The app's `pyproject.toml` at `version`; the keywords describe another app in the same
    form (the end-to-end tests build foreign apps with them)."""
    return f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "{description}"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
project-dir = ""
"""


def check_fab(content: bytes, claimed_sha256: str, fab_id: str, fab_version: str, version: str) -> None:
    """Raise `ForeignApp` unless the FAB is exactly our app at `version`.

    Compares the parsed `pyproject.toml` rather than zip bytes, so differences in
    how two machines zip the same text do not matter. Reads the zip directory
    and one small member; extracts, imports and installs nothing.
    """
    if len(content) > MAX_FAB_BYTES:
        raise ForeignApp(f"app bundle is {len(content)} bytes; ours is a few hundred")
    if hashlib.sha256(content).hexdigest() != claimed_sha256:
        raise ForeignApp("app bundle does not match its announced sha256")
    if fab_id != f"{APP_PUBLISHER}/{APP_NAME}" or fab_version != version:
        raise ForeignApp(f"run uses app {fab_id!r} {fab_version!r}, this node runs "
                         f"{APP_PUBLISHER}/{APP_NAME} {version}")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = set(bundle.namelist())
            if names - FAB_FILES:
                extra = sorted(names - FAB_FILES)
                raise ForeignApp(f"app bundle carries files this node did not install: {extra[:5]}")
            if FAB_FILES - names:
                raise ForeignApp(f"app bundle lacks {sorted(FAB_FILES - names)}")
            info = bundle.getinfo("pyproject.toml")
            if info.file_size > 64 * 1024:
                raise ForeignApp("app bundle's pyproject.toml is too large")
            got = tomllib.loads(bundle.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, OSError) as exc:
        raise ForeignApp(f"app bundle is unreadable: {exc}") from None
    if got != tomllib.loads(app_pyproject(version)):
        raise ForeignApp("app bundle's pyproject.toml differs from the installed loracommons app")


# --- The two Flower messages of a round (flwr is imported only when they are built or read) ---
# Task:  ConfigRecord "lc" {task: RoundTask JSON, note: JSON, downlink: header JSON}; "lc-adapter"
#        {adapter: bytes} (downlink: how the adapter bytes are read, see protocol/downlink.py; absent
#        means the whole adapter, float32, raw)
# Reply: ConfigRecord "lc" {manifest, signature, encoding, payload: packed bytes}
# (encoding: how the payload is packed for the wire, see protocol/wire.py; absent means raw)
#
# Every record is one object that each hop (coordinator -> SuperLink -> SuperNode -> node runner and
# back) moves with one HTTP request, and a round's latency is mostly those requests. A byte string
# up to INLINE_BYTES therefore travels as a ConfigRecord value (one object); a larger one as a raw
# uint8 Array in an ArrayRecord (record, array and 5 MiB chunks: objects that move in parallel).
# The adapter has a record of its own so that every volunteer's task shares it: the coordinator
# pushes it once a round. A reply's payload travels in "lc", or in ArrayRecord "lc-payload" when
# large. Readers take either form and refuse anything else.

INLINE_BYTES = 5 << 20
"""Largest byte string sent inline in a ConfigRecord (Flower's own Array chunk size)."""


def _blob_record(name: str, data: bytes):  # noqa: ANN202
    """A record holding `data` under `name`: inline up to INLINE_BYTES, else a chunked raw Array."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    if len(data) <= INLINE_BYTES:
        return ConfigRecord({name: data})
    return ArrayRecord({name: Array("uint8", (len(data),), "raw", data)})


def _blob(content, record: str, name: str) -> bytes:  # noqa: ANN001
    """The byte string `name` of `record`, sent by `_blob_record`."""
    try:
        value = content[record][name]
    except KeyError:
        raise ProtocolError(f"message lacks {record}/{name}") from None
    if isinstance(value, bytes):
        return value
    if getattr(value, "dtype", None) != "uint8" or getattr(value, "stype", None) != "raw" \
            or len(value.shape) != 1:
        raise ProtocolError(f"{record}/{name} is neither bytes nor a raw byte array")
    return bytes(value.data)


def _config_bytes(content, name: str) -> bytes:  # noqa: ANN001
    try:
        value = content["lc"][name]
    except KeyError:
        raise ProtocolError(f"message lacks lc/{name}") from None
    if not isinstance(value, bytes):
        raise ProtocolError(f"lc/{name} is not bytes")
    return value


def task_content(task_json: bytes, adapter: bytes, note: dict | None = None,  # noqa: ANN201
                 downlink: bytes | None = None):
    """A task's content; `downlink` is the `protocol.downlink.Downlink` header of the adapter bytes."""
    import json

    from flwr.app import ConfigRecord, RecordDict

    config = ConfigRecord({"task": task_json, "note": json.dumps(note or {}).encode()})
    if downlink is not None:
        config["downlink"] = downlink
    return RecordDict({
        "lc": config,
        "lc-adapter": _blob_record("adapter", adapter),
    })


def read_task(content) -> tuple[bytes, bytes, dict]:  # noqa: ANN001
    """(task JSON, global adapter bytes, note) from a task message's content; `ProtocolError` if malformed.

    The note is advisory (the outcome of the previous round): one that does not
    parse as a small JSON object is dropped, not an error.
    """

    try:
        task, adapter = _config_bytes(content, "task"), _blob(content, "lc-adapter", "adapter")
        note_raw = _config_bytes(content, "note") if "note" in content["lc"] else b"{}"
    except ProtocolError:
        raise
    except Exception as exc:  # the coordinator's records can be shaped any way at all
        raise ProtocolError(f"message is not a round task: {exc}") from None
    try:  # strict and bounded (size, nesting): a hostile note is dropped, never raised
        note = parse_json(note_raw, max_bytes=MAX_NOTE_BYTES, what="task note")
    except ProtocolError:
        note = {}
    return task, adapter, note if isinstance(note, dict) else {}


def read_downlink(content) -> bytes | None:  # noqa: ANN001
    """The downlink header of a task message's content, or None when it has none (whole adapter)."""
    try:
        if "downlink" not in content["lc"]:
            return None
    except Exception as exc:  # the coordinator's records can be shaped any way at all
        raise ProtocolError(f"message is not a round task: {exc}") from None
    return _config_bytes(content, "downlink")


def envelope_content(manifest: bytes, payload: bytes, signature: bytes, itemsize: int = 0):  # noqa: ANN201
    """A reply's content; with `itemsize` (bytes per number of the payload dtype) the payload
    travels packed by `wire.pack` when that is smaller."""
    from flwr.app import ConfigRecord, RecordDict

    encoding, packed = wire.pack(payload, itemsize) if itemsize else (wire.RAW, payload)
    lc = ConfigRecord({"manifest": manifest, "signature": signature, "encoding": encoding})
    if len(packed) <= INLINE_BYTES:
        lc["payload"] = packed
        return RecordDict({"lc": lc})
    return RecordDict({"lc": lc, "lc-payload": _blob_record("payload", packed)})


def read_envelope(content, max_payload_bytes: int) -> tuple[bytes, bytes, bytes]:  # noqa: ANN001
    """(manifest, payload, signature) from a reply's content, the payload unpacked but never
    past `max_payload_bytes`; `ProtocolError` if malformed."""
    try:
        manifest, signature = _config_bytes(content, "manifest"), _config_bytes(content, "signature")
        inline = "payload" in content["lc"]
        if inline and "lc-payload" in content:
            raise ProtocolError("reply carries its payload twice (lc/payload and lc-payload)")
        packed = _config_bytes(content, "payload") if inline else _blob(content, "lc-payload", "payload")
        encoding = content["lc"]["encoding"] if "encoding" in content["lc"] else wire.RAW
    except ProtocolError:
        raise
    except Exception as exc:  # a peer's records can be shaped any way at all
        raise ProtocolError(f"reply is not an update envelope: {exc}") from None
    if not isinstance(encoding, str):
        raise ProtocolError("lc/encoding is not a string")
    return manifest, wire.unpack(encoding, packed, max_payload_bytes), signature
