"""Canonical JSON: the one byte form that is hashed and signed.

Sorted keys, UTF-8, no whitespace, no NaN. Parsing is strict: a size limit
before decoding, a nesting limit before the recursive parser sees the text,
duplicate keys and non-finite numbers (NaN, Infinity, 1e400) refused, and
every failure a `Malformed` or `TooLarge`.
"""

import json
import math
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np

from loracommons.protocol.errors import Malformed, TooLarge

#: Deeper than anything the protocol writes (a safetensors header nests 3 levels), far
#: below the interpreter's recursion limit.
MAX_DEPTH = 32
#: A string literal, or an unterminated one up to the end: never backtracks, so linear in the text.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


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


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Malformed(f"number {text[:40]} in JSON is out of range")
    return value


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than `max_depth` without recursing (brackets inside strings don't count)."""
    bare = _STRING.sub("", text)
    if bare.count("[") + bare.count("{") <= max_depth:
        return
    depth = 0
    for bracket in _BRACKETS.findall(bare):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            raise Malformed(f"JSON nested deeper than {max_depth} levels")


def parse_json(data: bytes, *, max_bytes: int, what: str) -> dict[str, Any]:
    """Parse a JSON object from untrusted bytes; raises only `Malformed` or `TooLarge`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise Malformed(f"{what} is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise TooLarge(f"{what} is {len(data)} bytes, limit {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
        _check_depth(text, MAX_DEPTH)
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                         parse_float=_finite_float)
    except Malformed as exc:
        raise Malformed(f"{what}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Malformed(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise Malformed(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def plain_json(value: Any) -> Any:
    """`value` as plain JSON data: mappings with string keys, sets sorted, enums by value, numpy
    numbers as Python ones, non-finite floats as null; anything else is a TypeError."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(plain_json(v) for v in value)
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, Enum):  # PeftType.LORA -> "LORA"
        return plain_json(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float | np.floating):
        value = float(value)
        return value if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
