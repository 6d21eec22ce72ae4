"""Hostile behaviours a rehearsal can give some of its virtual volunteers.

Used only by `loracommons coordinator rehearse`: an operator checks that the project's
robust settings hold before launch. Each fault changes the envelope the honest volunteer
built (as the security suite's hostile node does), and signs the result with that
volunteer's own key, so the coordinator sees a validly signed but hostile update.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from loracommons.protocol import modes
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.envelope import Envelope, sign_update
from loracommons.protocol.identity import SigningKey
from loracommons.protocol.task import RoundTask

REPLACEMENT_SCALE = 100.0
"""Model replacement: the honest delta times this (the security suite's `scaled` mode)."""
INFLATED_EXAMPLES = 10**9
"""Weight inflation: the example count claimed."""

Fault = Callable[[Envelope, RoundTask, bytes, SigningKey], Envelope]


def _claims(envelope: Envelope) -> dict:
    """The sender-set manifest fields (what `sign_update` takes)."""
    claims = json.loads(envelope.manifest)
    for derived in ("format_version", "payload_sha256", "payload_bytes", "signer"):
        claims.pop(derived, None)
    return claims


def _resign(key: SigningKey, envelope: Envelope, payload: bytes | None = None, **changes: object) -> Envelope:
    return sign_update(key, envelope.payload if payload is None else payload,
                       **{**_claims(envelope), **changes})


def model_replacement(envelope: Envelope, task: RoundTask, adapter: bytes, key: SigningKey) -> Envelope:
    """Sends global + 100 x the honest delta: one update that tries to replace the model."""
    limit = task.max_payload_bytes * 2 + (1 << 20)
    sent = decode_tensors(envelope.payload, max_bytes=limit)
    start = decode_tensors(adapter, max_bytes=limit)
    names = modes.get(task.mode).sent_names(start)
    scaled = {}
    for name, value in sent.items():
        base = np.asarray(start[name], dtype=np.float32) if name in names else 0.0
        scaled[name] = (base + REPLACEMENT_SCALE * (np.asarray(value, dtype=np.float32) - base)
                        ).astype(np.float32)
    return _resign(key, envelope, encode_tensors(scaled, dtype=task.payload_dtype))


def weight_inflation(envelope: Envelope, task: RoundTask, adapter: bytes, key: SigningKey) -> Envelope:
    """Claims a billion training examples, to buy weight in the round's mean."""
    return _resign(key, envelope, examples=INFLATED_EXAMPLES)


FAULTS: dict[str, Fault] = {
    "model_replacement": model_replacement,
    "weight_inflation": weight_inflation,
}


def get(name: str) -> Fault:
    try:
        return FAULTS[name]
    except KeyError:
        raise ValueError(f"unknown hostile behaviour {name!r} (known: {', '.join(FAULTS)})") from None
