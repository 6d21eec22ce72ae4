"""Every parser of outside bytes raises only `ProtocolError` (issue 15, item 1 and 11).

Property test over the parsers a peer, a mirror or a coordinator can feed: canonical JSON, the
update envelope and its manifest, the round task, the advisory note, wire unpacking, the release
document and manifest, public keys and safetensors payloads. Inputs: arbitrary bytes and text,
and valid documents with one field replaced by a hostile JSON fragment (huge integers, numbers
out of float range, deep nesting, lone surrogates, wrong types). Anything but a `ProtocolError`
(OverflowError, RecursionError, TypeError, ...) fails the test. Example counts are bounded so
that the file runs in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracommons.protocol import wire
from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.downlink import Downlink
from loracommons.protocol.envelope import Envelope, open_envelope, sign_update
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import PublicKey, SigningKey
from loracommons.protocol.release import ReleaseManifest, SignedRelease, verify_release
from loracommons.protocol.task import LoraSettings, RoundTask, TrainSettings

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEY = SigningKey.generate("volunteer")
RELEASE_KEY = SigningKey.generate("coordinator")
PAYLOAD = encode_tensors({"a.lora_B.weight": np.ones((2, 2), np.float32)})
ENVELOPE = sign_update(KEY, PAYLOAD, project_id="p", round=1, nonce="00" * 16, base_adapter_digest="ab" * 32,
                       base_model_id="m", base_model_revision="r", lora_config_digest="cd" * 32, examples=8,
                       steps=4, train_loss=1.5, payload_dtype="float32")
TASK = RoundTask(project_id="p", round=1, nonce="00" * 16, base_adapter_digest="ab" * 32, base_model_id="m",
                 base_model_revision="r", mode="ffa", lora=LoraSettings(), train=TrainSettings())
RELEASE = ReleaseManifest(format_version=1, project_id="p", version=1, round=1, base_model_id="m",
                          base_model_revision="r", files={"adapter_model.safetensors": {"size": 4,
                                                                                        "sha256": "ab" * 32}},
                          previous="", updates_digest="cd" * 32, metrics={"train_loss": 1.0},
                          created="2026-01-01T00:00:00Z", signer=RELEASE_KEY.public.openssh)

#: JSON fragments that have broken parsers: each is valid JSON text or close to it.
HOSTILE = [
    "1" * 400, "-" + "9" * 400, "1" * 5000, "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity",
    "[" * 4000 + "]" * 4000, "[" * 4000, "{\"a\":" * 3000 + "1" + "}" * 3000, '"\\ud800"', '"\\udfff x"',
    "true", "false", "null", "0.5", "-1", "0", str(2**63), str(-(2**63) - 1), "{}", "[]", '""', '"x"',
    '["a", 1]', '{"size": 1, "sha256": "' + "ab" * 32 + '"}', '"' + "x" * 70000 + '"',
]
hostile_fragment = st.sampled_from(HOSTILE) | st.integers().map(str) | st.floats(allow_nan=False,
                                                                                 allow_infinity=False).map(repr)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
junk = st.binary(max_size=512) | st.text(max_size=256).map(lambda t: t.encode("utf-8", "surrogatepass"))


def with_fragment(obj: dict, path: list[str], fragment: str) -> bytes:
    """`obj` as canonical JSON with the value at `path` (or a new key there) replaced by raw `fragment`."""
    obj = json.loads(json.dumps(obj))
    target = obj
    for name in path[:-1]:
        target = target[name]
    target[path[-1]] = "@@HOSTILE@@"
    return canonical_json(obj).replace(b'"@@HOSTILE@@"', fragment.encode("utf-8", "surrogatepass"))


def field_paths(obj: dict, prefix: list[str] | None = None) -> list[list[str]]:
    """Every key path of a nested dict, plus an unknown key at the top."""
    prefix = prefix or []
    out = [[*prefix, "unknown_field"]] if not prefix else []
    for name, value in obj.items():
        out.append([*prefix, name])
        if isinstance(value, dict):
            out.extend(field_paths(value, [*prefix, name]))
    return out


MANIFEST = json.loads(ENVELOPE.manifest)
TASK_OBJ = json.loads(TASK.to_bytes())
RELEASE_OBJ = json.loads(RELEASE.to_bytes())


def only_protocol_errors(parse, data) -> None:  # noqa: ANN001
    try:
        parse(data)
    except ProtocolError:
        pass


def open_manifest(manifest: bytes) -> None:
    open_envelope(Envelope(manifest, ENVELOPE.payload, ENVELOPE.signature), max_payload_bytes=1 << 20)


def read_release_document(data: bytes) -> None:
    verify_release(SignedRelease.from_json(data), RELEASE_KEY.public.fingerprint)


def read_release_manifest(manifest: bytes) -> None:
    verify_release(SignedRelease(manifest, b"\0" * 64), RELEASE_KEY.public.fingerprint)
    ReleaseManifest.from_dict(parse_json(manifest, max_bytes=1 << 20, what="release manifest"))


PARSERS = {
    "canonical_json": lambda data: parse_json(data, max_bytes=1 << 20, what="input"),
    "update_manifest": open_manifest,
    "round_task": RoundTask.from_bytes,
    "release_document": read_release_document,
    "release_manifest": read_release_manifest,
    "public_key": PublicKey.from_openssh,
    "safetensors": lambda data: decode_tensors(data, max_bytes=1 << 20),
    "downlink_header": Downlink.from_bytes,
}
DOWNLINK_OBJ = json.loads(Downlink("sent", "bfloat16", "shuffle2-zlib", "ab" * 32).to_bytes())
DOCUMENTS = {"update_manifest": MANIFEST, "round_task": TASK_OBJ, "release_manifest": RELEASE_OBJ,
             "downlink_header": DOWNLINK_OBJ}


@pytest.mark.parametrize("parser", list(PARSERS))
@FAST
@given(data=junk)
def test_arbitrary_bytes_raise_only_protocol_errors(parser, data):
    only_protocol_errors(PARSERS[parser], data)


@pytest.mark.parametrize("parser", ["canonical_json", "update_manifest", "round_task", "release_manifest",
                                    "downlink_header"])
@FAST
@given(value=json_values)
def test_arbitrary_json_raises_only_protocol_errors(parser, value):
    only_protocol_errors(PARSERS[parser], json.dumps(value).encode())


@pytest.mark.parametrize("document", list(DOCUMENTS))
@FAST
@given(data=st.data(), fragment=hostile_fragment)
def test_one_hostile_field_raises_only_protocol_errors(document, data, fragment):
    obj = DOCUMENTS[document]
    path = data.draw(st.sampled_from(field_paths(obj)))
    only_protocol_errors(PARSERS[document], with_fragment(obj, path, fragment))


@pytest.mark.parametrize("fragment", HOSTILE)
@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_each_hostile_fragment_in_each_field(document, fragment):
    """The fixed list in every field, exhaustively (the review's cases: 400 digits, 4000 brackets)."""
    obj = DOCUMENTS[document]
    for path in field_paths(obj):
        only_protocol_errors(PARSERS[document], with_fragment(obj, path, fragment))


def test_release_document_wrapping_a_hostile_manifest():
    for fragment in HOSTILE:
        manifest = with_fragment(RELEASE_OBJ, ["version"], fragment).decode("utf-8", "surrogatepass")
        doc = json.dumps({"manifest": manifest, "signature": "AAAA"}).encode()
        only_protocol_errors(read_release_document, doc)


@FAST
@given(encoding=st.sampled_from([*wire.ENCODINGS, "shuffle8-zlib", "", "x" * 100]),
       packed=st.binary(max_size=512), limit=st.integers(0, 4096))
def test_wire_unpack_raises_only_protocol_errors(encoding, packed, limit):
    only_protocol_errors(lambda data: wire.unpack(encoding, data, limit), packed)


@FAST
@given(text=st.text(max_size=200), prefix=st.sampled_from(["", "ssh-ed25519 ", "ecdsa-sha2-nistp256 "]))
def test_public_key_text_raises_only_protocol_errors(text, prefix):
    only_protocol_errors(PublicKey.from_openssh, prefix + text)
    only_protocol_errors(PublicKey.from_openssh, (prefix + text).encode("utf-8", "surrogatepass"))


def test_the_reviews_late_reply_manifest_is_malformed():
    """A 400-digit train_loss (the review's case) is refused as Malformed, not OverflowError."""
    from loracommons.protocol.errors import Malformed

    with pytest.raises(Malformed, match="train_loss"):
        open_manifest(with_fragment(MANIFEST, ["train_loss"], "1" * 400))
    with pytest.raises(Malformed, match="examples"):
        open_manifest(with_fragment(MANIFEST, ["examples"], "1" * 400))
    with pytest.raises(Malformed, match="at most 63 bits"):  # SQLite's INTEGER would overflow later
        open_manifest(with_fragment(MANIFEST, ["examples"], str(2**63)))


def test_deep_nesting_is_malformed_before_the_recursive_parser():
    from loracommons.protocol.errors import Malformed

    for text in ("[" * 4000, "[" * 4000 + "]" * 4000, '{"a":' * 100 + "1" + "}" * 100):
        with pytest.raises(Malformed, match="nested deeper"):
            parse_json(text.encode(), max_bytes=1 << 20, what="note")
    assert parse_json(b'{"a": "' + b"[" * 4000 + b'"}', max_bytes=1 << 20, what="note") == {"a": "[" * 4000}


def note_content(note: bytes):  # noqa: ANN201
    """A task message whose advisory note is `note`, as a hostile coordinator would send it."""
    from flwr.app import ConfigRecord

    from loracommons.protocol.flower_app import task_content

    content = task_content(TASK.to_bytes(), PAYLOAD)
    content["lc"] = ConfigRecord({"task": TASK.to_bytes(), "note": note})
    return content


def test_deeply_nested_note_is_dropped():
    from loracommons.protocol.flower_app import read_task

    assert read_task(note_content(b"[" * 4000))[2] == {}


@FAST
@given(note=junk | st.sampled_from(HOSTILE).map(str.encode))
def test_hostile_note_never_raises_past_read_task(note):
    from loracommons.protocol.flower_app import read_task

    task, _, parsed = read_task(note_content(note))
    assert task == TASK.to_bytes() and isinstance(parsed, dict)


def safetensors_with_shape(shape: str) -> bytes:
    header = b'{"t":{"dtype":"F32","shape":' + shape.encode() + b',"data_offsets":[0,0]}}'
    return len(header).to_bytes(8, "little") + header


def test_zero_size_tensor_with_a_huge_dimension_is_bad_tensor():
    only_protocol_errors(lambda data: decode_tensors(data, max_bytes=1 << 20),
                         safetensors_with_shape("[" + "9" * 400 + ", 0]"))
