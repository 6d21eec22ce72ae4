"""The downlink: how a round task carries the global adapter, and how a volunteer rebuilds it.

A task names the global adapter by `base_adapter_digest`, the sha256 of its canonical
float32 encoding (`codec.canonical_digest`). What travels next to the task is one of:

    all     every tensor, in the downlink dtype, packed (`protocol/wire.py`, lossless)
    sent    only the tensors the mode trains and sends (`Mode.sent_names`: B in `ffa`); the
            volunteer regenerates the others (A) from the project seed (`RoundTask.adapter_seed`)
    delta   either of the two, XORed byte for byte with the same encoding of a version the
            volunteer still holds (`delta_from`, that version's digest), then packed: what did
            not change is zeros and packs to almost nothing; applying it is exact

Whichever it is, the volunteer rebuilds the full adapter, encodes it canonically and compares
the digest with the task's before it trains (`rebuild`): tampered factors, a wrong seed or a
wrong delta all end in `DownlinkMismatch`, and a delta against a version it does not hold in
`BaseUnavailable`; both refuse the round, and the coordinator sends the whole adapter next.
The header (`Downlink`) is small canonical JSON; no torch, no flwr.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from loracommons.protocol import modes, wire
from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.codec import DTYPES, canonical_digest, decode_tensors, encode_tensors
from loracommons.protocol.errors import BaseUnavailable, DownlinkMismatch, Malformed, ProtocolError

ALL, SENT = "all", "sent"
MAX_HEADER_BYTES = 1024


@dataclass(frozen=True)
class Downlink:
    """How the adapter bytes of one task message are to be read."""

    tensors: str = ALL  # ALL or SENT
    dtype: str = "float32"
    encoding: str = wire.RAW
    delta_from: str = ""  # digest of the held version the bytes are XORed with; "" for none

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))

    @classmethod
    def from_bytes(cls, data: bytes) -> Downlink:
        obj = parse_json(data, max_bytes=MAX_HEADER_BYTES, what="downlink header")
        if not isinstance(obj, dict) or set(obj) - set(asdict(cls())) or not all(
            isinstance(value, str) for value in obj.values()
        ):
            raise Malformed("downlink header: expected an object of strings: tensors, dtype, encoding, "
                            "delta_from")
        link = cls(**obj)
        if link.tensors not in (ALL, SENT):
            raise Malformed(f"downlink tensors {str(link.tensors)[:20]!r}: expected {ALL!r} or {SENT!r}")
        if link.dtype not in DTYPES:
            raise Malformed(f"downlink dtype {str(link.dtype)[:20]!r} not one of {sorted(DTYPES)}")
        if link.encoding not in wire.ENCODINGS:
            raise Malformed(f"downlink encoding {link.encoding[:40]!r} not one of {list(wire.ENCODINGS)}")
        if len(link.delta_from) not in (0, 64):
            raise Malformed("downlink delta_from: expected a digest or nothing")
        return link


@dataclass(frozen=True)
class Held:
    """The full adapter a volunteer last rebuilt and checked: what a delta may apply to."""

    digest: str
    tensors: Mapping[str, np.ndarray]


def names_for(tensors: str, mode: str, names: Mapping[str, object] | list[str]) -> list[str]:
    """The tensor names a downlink of kind `tensors` carries, sorted."""
    return modes.get(mode).sent_names(names) if tensors == SENT else sorted(names)


def payload(tensors: Mapping[str, np.ndarray], names: list[str], dtype: str) -> bytes:
    """The bytes a downlink packs (or XORs): `names` of `tensors`, encoded in `dtype`."""
    return encode_tensors({name: tensors[name] for name in names}, dtype=dtype)


def _xor(a: bytes, b: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)).tobytes()


def build(
    tensors: Mapping[str, np.ndarray],
    mode: str,
    dtype: str,
    *,
    regenerate: bool,
    held: Held | None = None,
) -> tuple[Downlink, bytes]:
    """The smallest downlink of `tensors`: `sent` when the volunteer can `regenerate` the rest,
    else `all`; a delta against `held` when that packs smaller. `tensors` must be representable
    in `dtype` (the coordinator rounds its global to the downlink dtype), or the digest fails."""
    kind = SENT if regenerate else ALL
    names = names_for(kind, mode, list(tensors))
    itemsize = DTYPES[dtype][1]
    body = payload(tensors, names, dtype)
    encoding, packed = wire.pack(body, itemsize)
    best = Downlink(kind, dtype, encoding), packed
    if held is not None and set(held.tensors) == set(tensors) and all(
        np.shape(held.tensors[n]) == np.shape(tensors[n]) for n in names
    ):
        old = payload(held.tensors, names, dtype)
        if len(old) == len(body):
            encoding, packed = wire.pack(_xor(body, old), itemsize)
            if len(packed) < len(best[1]):
                best = Downlink(kind, dtype, encoding, held.digest), packed
    return best


def rebuild(
    link: Downlink,
    data: bytes,
    *,
    mode: str,
    digest: str,
    max_bytes: int,
    held: Held | None,
    regenerate: Callable[[], Mapping[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The full global adapter from a downlink, checked against `digest` (the task's).

    `regenerate` gives version 0 as the volunteer derives it from the seed (called only for
    `sent`). Raises `BaseUnavailable` or `DownlinkMismatch` (or another `ProtocolError` for
    bytes that do not parse); returns float32 arrays.
    """
    body = wire.unpack(link.encoding, data, max_bytes)
    if link.delta_from:
        if held is None or held.digest != link.delta_from:
            raise BaseUnavailable(f"delta against {link.delta_from[:12]}, a version this node does not hold")
        old = payload(held.tensors, names_for(link.tensors, mode, list(held.tensors)), link.dtype)
        if len(old) != len(body):
            raise DownlinkMismatch("delta does not fit the version it claims to apply to")
        body = _xor(body, old)
    try:
        received = decode_tensors(body, max_bytes=max_bytes)
    except ProtocolError as exc:
        raise DownlinkMismatch(f"downlink tensors do not parse, so they are not the adapter the task's "
                               f"digest names: {exc}") from None
    full = {name: np.array(value, dtype=np.float32) for name, value in received.items()}
    if link.tensors == SENT:
        initial = regenerate()
        if sorted(received) != names_for(SENT, mode, list(initial)):
            raise DownlinkMismatch("downlink tensors are not the ones the mode trains")
        full = {**{n: np.asarray(v, dtype=np.float32) for n, v in initial.items()}, **full}
    if canonical_digest(full) != digest:
        raise DownlinkMismatch("the adapter rebuilt from the task (received factors + factors from the seed) "
                               "does not match the task's digest")
    return full
