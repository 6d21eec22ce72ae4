"""Canonical JSON: the one byte form that is hashed and signed.

Sorted keys, UTF-8, no whitespace, no NaN. Parsing is strict: a size limit
before decoding, duplicate keys and non-finite numbers refused.
"""

import json
from typing import Any

from loracommons.protocol.errors import Malformed, TooLarge


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Malformed(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise Malformed(f"non-finite number {name} in JSON")


def parse_json(data: bytes, *, max_bytes: int, what: str) -> dict[str, Any]:
    """Parse a JSON object from untrusted bytes."""
    if len(data) > max_bytes:
        raise TooLarge(f"{what} is {len(data)} bytes, limit {max_bytes}")
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except Malformed:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Malformed(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Malformed(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj
