"""Fuzz the parsers of untrusted bytes for a bounded time: nothing but `ProtocolError` may escape.

Targets (each fed by hypothesis from valid seeds, mutated):

    envelope  open_envelope + verify_update on an update envelope whose manifest fields, manifest
              bytes, payload and signature are mutated; most mutants are re-signed with the
              sender's key, so they get past the signature to the claim and payload checks
    codec     decode_tensors on mutated safetensors bytes (header JSON, offsets, dtypes, shapes,
              data, random bytes), with and without an expected spec
    release   SignedRelease.from_json, verify_release and verify_chain on mutated release
              documents; mutated manifests are re-signed with the coordinator key
    manifest  UpdateManifest.from_dict and ReleaseManifest.from_dict on arbitrary JSON objects
              derived from valid ones

Any other exception is an escape: recorded (target, type, message, input) and the exit code is 1.
Hypothesis runs without its example database, in batches with fresh seeds until the time is up.

    python bench/fuzz_parsers.py --seconds 600             # nightly
    python bench/fuzz_parsers.py --seconds 3 --out /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import os
import platform
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import hypothesis
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracommons.protocol.canonical import canonical_json
from loracommons.protocol.codec import TensorSpec, decode_tensors, encode_tensors
from loracommons.protocol.envelope import (
    DOMAIN as UPDATE_DOMAIN,
)
from loracommons.protocol.envelope import (
    Envelope,
    Expected,
    UpdateManifest,
    open_envelope,
    sign_update,
    verify_update,
)
from loracommons.protocol.errors import ProtocolError
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.release import (
    DOMAIN as RELEASE_DOMAIN,
)
from loracommons.protocol.release import (
    ReleaseManifest,
    SignedRelease,
    sign_release,
    verify_chain,
    verify_release,
)

DEFAULT_OUT = Path("bench/results/fuzz.json")
BATCH = 100  # examples per hypothesis run; runs repeat with fresh seeds until the time is up
MAX_ESCAPES_KEPT = 20

# --- valid seeds ------------------------------------------------------------------------------

VOLUNTEER = SigningKey.generate("volunteer")
COORDINATOR = SigningKey.generate("coordinator")
_PREFIX = "base_model.model.model.layers.0.self_attn"
SHAPES = {f"{_PREFIX}.q_proj.lora_B.weight": (8, 2), f"{_PREFIX}.v_proj.lora_B.weight": (8, 2)}
SPEC = TensorSpec(SHAPES, frozenset({"float32"}))
TENSORS = {n: np.arange(np.prod(s), dtype=np.float32).reshape(s) / 7 for n, s in SHAPES.items()}
PAYLOAD = encode_tensors(TENSORS)
EXPECTED = Expected(project_id="fuzz-project", round=3, nonce="ab" * 16, base_adapter_digest="cd" * 32,
                    base_model_id="tiny/llama", base_model_revision="main", lora_config_digest="ef" * 32,
                    spec=SPEC, max_payload_bytes=SPEC.payload_bytes("float32"))
CLAIMS = {"project_id": EXPECTED.project_id, "round": EXPECTED.round, "nonce": EXPECTED.nonce,
          "base_adapter_digest": EXPECTED.base_adapter_digest, "base_model_id": EXPECTED.base_model_id,
          "base_model_revision": EXPECTED.base_model_revision,
          "lora_config_digest": EXPECTED.lora_config_digest, "examples": 40, "steps": 8, "train_loss": 1.5,
          "payload_dtype": "float32"}
ENVELOPE = sign_update(VOLUNTEER, PAYLOAD, **CLAIMS)


def _release(version: int, previous: str) -> SignedRelease:
    weights = {"size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    files = {"adapter_config.json": {"size": 10, "sha256": "1" * 64}, "adapter_model.safetensors": weights}
    return sign_release(COORDINATOR, ReleaseManifest(
        format_version=1, project_id="fuzz-project", version=version, round=version,
        base_model_id="tiny/llama", base_model_revision="main", files=files, previous=previous,
        updates_digest="2" * 64,
        metrics={"train_loss": 1.0}, created="2026-01-01T00:00:00Z", signer=COORDINATOR.public.openssh))


RELEASE1 = _release(1, "")
RELEASE2 = _release(2, RELEASE1.digest)
PINNED = COORDINATOR.public.fingerprint

# --- mutation strategies -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=12), children, max_size=4)),
    max_leaves=12,
)


@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte-level edits: flips, cuts, inserts, slice swaps; or random bytes."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=512))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "dup"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 0x22, 0x2C, 0x5B, 0x7B, 0x7D, 0xFF, 0x30, 0x2D]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def mutated_object(draw: st.DrawFn, obj: dict) -> dict:
    """A JSON object derived from `obj`: fields replaced, removed, added, nested values edited."""
    out = json.loads(json.dumps(obj))
    keys = sorted(out)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "remove", "add", "nudge"]))
        key = draw(st.sampled_from(keys))
        if op == "replace":
            out[key] = draw(JSON_VALUES)
        elif op == "remove":
            out.pop(key, None)
        elif op == "add":
            out[draw(st.text(max_size=12))] = draw(JSON_VALUES)
        elif isinstance(out.get(key), int) and not isinstance(out.get(key), bool):
            out[key] += draw(st.sampled_from([-(2**63), -1, 1, 2**31, 2**64]))
        elif isinstance(out.get(key), str):
            out[key] = out[key] + draw(st.sampled_from(["", "\x00", "\ud800", "/../", "é", "0" * 64]))
        elif isinstance(out.get(key), dict) and out[key]:
            inner = draw(st.sampled_from(sorted(out[key])))
            out[key][inner] = draw(JSON_VALUES)
    return out


def _json_bytes(draw: st.DrawFn, obj: dict) -> bytes:
    """Canonical JSON most of the time; sometimes another (non-canonical) form of the same object."""
    form = draw(st.sampled_from(["canonical", "canonical", "canonical", "spaced", "ascii"]))
    try:
        if form == "canonical":
            return canonical_json(obj)
        return json.dumps(obj, indent=1 if form == "spaced" else None, ensure_ascii=form == "ascii").encode(
            "utf-8", "surrogatepass")
    except (ValueError, TypeError):
        return json.dumps(obj, ensure_ascii=True).encode()


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(["claims", "manifest", "payload", "raw"]))
    if kind == "claims":  # mutated claims, properly signed: reaches the claim and payload checks
        claims = draw(mutated_object(CLAIMS))
        payload = draw(st.one_of(st.just(PAYLOAD), mutated_bytes(PAYLOAD), safetensors_payloads()))
        manifest = {**claims, "format_version": 1, "payload_sha256": hashlib.sha256(payload).hexdigest(),
                    "payload_bytes": len(payload), "signer": VOLUNTEER.public.openssh}
        if draw(st.booleans()):
            manifest = draw(mutated_object(manifest))
        raw = _json_bytes(draw, manifest)
        return Envelope(raw, payload, VOLUNTEER.sign(UPDATE_DOMAIN + hashlib.sha256(raw).digest()))
    if kind == "manifest":  # mutated manifest bytes, re-signed or not
        raw = draw(mutated_bytes(ENVELOPE.manifest))
        signature = (VOLUNTEER.sign(UPDATE_DOMAIN + hashlib.sha256(raw).digest()) if draw(st.booleans())
                     else ENVELOPE.signature)
        return Envelope(raw, ENVELOPE.payload, signature)
    if kind == "payload":  # a signed manifest pinning a mutated payload
        payload = draw(st.one_of(mutated_bytes(PAYLOAD), safetensors_payloads()))
        return sign_update(VOLUNTEER, payload, **CLAIMS)
    return Envelope(draw(mutated_bytes(ENVELOPE.manifest)), draw(mutated_bytes(ENVELOPE.payload)),
                    draw(mutated_bytes(ENVELOPE.signature)))


@st.composite
def safetensors_payloads(draw: st.DrawFn) -> bytes:
    """A safetensors container whose JSON header is mutated (entries, offsets, dtypes, shapes)."""
    header_len = struct.unpack_from("<Q", PAYLOAD)[0]
    header = json.loads(PAYLOAD[8:8 + header_len])
    body = PAYLOAD[8 + header_len:]
    name = draw(st.sampled_from(sorted(header)))
    if name != "__metadata__" and draw(st.booleans()):
        header[name] = draw(mutated_object(header[name]))
    else:
        header = draw(mutated_object(header))
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 8))
    body = draw(st.one_of(st.just(body), mutated_bytes(body)))
    declared = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", declared) + raw + body


@st.composite
def release_documents(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["manifest", "document", "raw"]))
    if kind == "manifest":  # a mutated manifest signed by the coordinator: reaches from_dict
        obj = draw(mutated_object(json.loads(RELEASE2.manifest)))
        raw = _json_bytes(draw, obj)
        signature = COORDINATOR.sign(RELEASE_DOMAIN + hashlib.sha256(raw).digest())
        doc = {"manifest": raw.decode("utf-8", "surrogatepass"),
               "signature": base64.b64encode(signature).decode()}
        return json.dumps(doc, separators=(",", ":")).encode()  # \u escapes carry any lone surrogate
    if kind == "document":
        doc = json.loads(RELEASE2.to_json())
        return _json_bytes(draw, draw(mutated_object(doc)))
    return draw(mutated_bytes(RELEASE2.to_json()))


# --- targets ------------------------------------------------------------------------------------


def target_envelope(env: Envelope) -> None:
    open_envelope(env, max_payload_bytes=EXPECTED.max_payload_bytes)
    verify_update(env, EXPECTED)


def target_codec(data: bytes) -> None:
    decode_tensors(data, max_bytes=1 << 20)
    decode_tensors(data, max_bytes=1 << 20, spec=SPEC, require_finite=False)


def target_release(doc: bytes) -> None:
    signed = SignedRelease.from_json(doc)
    verify_release(signed, PINNED)
    verify_chain([signed], PINNED, after=RELEASE1)


def target_manifest(obj: dict) -> None:
    UpdateManifest.from_dict(obj)
    ReleaseManifest.from_dict(obj)


TARGETS: dict[str, tuple[Callable, st.SearchStrategy]] = {
    "envelope": (target_envelope, envelopes()),
    "codec": (target_codec, st.one_of(safetensors_payloads(), mutated_bytes(PAYLOAD))),
    "release": (target_release, release_documents()),
    "manifest": (target_manifest, st.one_of(
        mutated_object(json.loads(ENVELOPE.manifest)), mutated_object(json.loads(RELEASE2.manifest)))),
}


def _describe(value: object) -> str:
    if isinstance(value, Envelope):
        parts = ("manifest", "payload", "signature")
        return json.dumps({part: getattr(value, part)[:300].hex() for part in parts})
    if isinstance(value, bytes):
        return value[:600].hex()
    return repr(value)[:600]


def _batch(name: str, seed: int, deadline: float, stats: dict, escapes: list[dict]) -> None:
    """One hypothesis run of BATCH examples of target `name`, counting into `stats`."""
    function, strategy = TARGETS[name]

    @given(strategy)
    @settings(max_examples=BATCH, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    def run(value: object) -> None:
        if time.monotonic() > deadline and stats["examples"]:
            return
        stats["examples"] += 1
        try:
            function(value)
            stats["accepted"] += 1
        except ProtocolError:
            stats["protocol_errors"] += 1
        except Exception as exc:  # an escape: what this bench exists to find
            stats["escapes"] += 1
            if len(escapes) < MAX_ESCAPES_KEPT:
                escapes.append({"target": name, "type": type(exc).__name__, "message": str(exc)[:300],
                                "input": _describe(value),
                                "traceback": traceback.format_exc(limit=-4)[-1500:]})

    hypothesis.seed(seed)(run)()


def fuzz(seconds: float, seed: int | None = None) -> dict:
    """Run every target in turn, BATCH examples at a time, until `seconds` have passed."""
    rng = random.Random(seed)
    counts = {name: {"examples": 0, "escapes": 0, "protocol_errors": 0, "accepted": 0} for name in TARGETS}
    escapes: list[dict] = []
    started = time.monotonic()
    deadline = started + seconds
    turn = 0
    while time.monotonic() < deadline or turn < len(TARGETS):  # at least one batch per target
        name = list(TARGETS)[turn % len(TARGETS)]
        turn += 1
        _batch(name, rng.getrandbits(64), deadline, counts[name], escapes)
    elapsed = time.monotonic() - started
    total = sum(c["examples"] for c in counts.values())
    return {
        "seconds": round(elapsed, 2),
        "requested_seconds": seconds,
        "seed": seed,
        "examples": total,
        "examples_per_s": round(total / elapsed, 1) if elapsed else None,
        "targets": counts,
        "escapes": escapes,
        "ok": not any(c["escapes"] for c in counts.values()),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "python": sys.version.split()[0], "hypothesis": hypothesis.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time to fuzz for (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the batch seeds (default: random)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON result (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not args.seconds > 0:
        parser.error("--seconds must be positive")
    result = fuzz(args.seconds, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    per_target = ", ".join(f"{n} {c['examples']}" for n, c in result["targets"].items())
    escaped = sum(c["escapes"] for c in result["targets"].values())
    print(f"{result['examples']} inputs in {result['seconds']:.1f} s ({per_target}); "
          f"{escaped} escaped ProtocolError -> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
