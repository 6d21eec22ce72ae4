"""What the coordinator asks of a volunteer in one round, as plain data.

The `RoundTask` travels as canonical JSON next to the global adapter bytes; the
volunteer trains to it and signs claims that echo it. `LoraSettings` is the
LoRA configuration both sides build their PEFT model from; its digest is
signed in every update so that factors trained under another configuration
are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields

from loracommons.protocol import modes
from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.codec import DTYPES
from loracommons.protocol.envelope import sha256_hex
from loracommons.protocol.errors import Malformed, MissingField, UnknownField

MAX_TASK_BYTES = 64 * 1024
PROJECT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""A project id: what `[project] id` may be, and what a volunteer accepts in a task."""

# The bounds of every numeric task field: the project config checks its [lora]/[train]/[limits]
# keys against them (coordinator/config.py) and a volunteer checks every task it receives, so a
# coordinator cannot ask for what no project file could hold (10**18 steps, inf minutes).
LORA_BOUNDS: dict[str, dict] = {
    "r": {"ge": 1, "le": 4096},
    "alpha": {"gt": 0},
    "dropout": {"ge": 0, "lt": 1},
    "target_modules": {"nonempty": True},
}
TRAIN_BOUNDS: dict[str, dict] = {
    "max_steps": {"ge": 1, "le": 1_000_000},
    "max_minutes": {"gt": 0, "le": 7 * 24 * 60},
    "batch_size": {"ge": 1, "le": 65_536},
    "grad_accum": {"ge": 1, "le": 65_536},
    "learning_rate": {"gt": 0, "le": 10},
    "warmup_steps": {"ge": 0, "le": 1_000_000},
    "weight_decay": {"ge": 0, "le": 10},
    "seq_len": {"ge": 8, "le": 1 << 20},
    "seed": {"ge": 0, "le": 2**32},
    "keep_optimizer": {},
}
MAX_ROUND = 2**31 - 1
"""Far beyond any project's life; keeps the per-round seeds a volunteer derives within range."""
MAX_SEED = 2**63 - 1
DOWNLINK_DTYPES = ("float32", "bfloat16")
"""The dtypes a global adapter may travel in (`[round] downlink_dtype`)."""
PAYLOAD_BOUNDS: dict[str, int] = {"ge": 1024, "le": 1 << 40}
"""`max_payload_bytes` of a task ([limits] in the project file)."""

_CHECKS = (("ge", lambda v, b: v >= b, "at least"), ("gt", lambda v, b: v > b, "greater than"),
           ("le", lambda v, b: v <= b, "at most"), ("lt", lambda v, b: v < b, "less than"))


def bound_problem(value: object, bounds: dict) -> str | None:
    """What is wrong with a number against its bounds (ge, gt, le, lt), or None."""
    for check, holds, words in _CHECKS:
        if check in bounds and not holds(value, bounds[check]):
            return f"expected {words} {bounds[check]}"
    return None


def _shown(value: object) -> str:
    """A value for an error line: short, and safe for an integer of thousands of digits."""
    try:
        return repr(value)[:40]
    except ValueError:  # int -> str conversion limit
        return f"<{type(value).__name__} too large to show>"


def _finite(value: object) -> bool:
    try:  # a 400-digit integer is not a float either
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    except OverflowError:
        return False


def _check_number(what: str, name: str, value: object, default: object, bounds: dict) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "true or false"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    else:
        ok = _finite(value)
        kind = "a finite number"
    if not ok:
        raise Malformed(f"{what} {name} = {_shown(value)}: expected {kind}")
    problem = bound_problem(value, bounds)
    if problem:
        raise Malformed(f"{what} {name} = {_shown(value)}: {problem}")


def _check_bounded(cls: type, obj: dict, bounds: dict[str, dict], what: str) -> None:
    """Every numeric field present in `obj` has the type of its default and lies within its bounds."""
    for f in fields(cls):
        if f.name in obj and isinstance(f.default, int | float):
            _check_number(what, f.name, obj[f.name], f.default, bounds.get(f.name, {}))


def _check_fields(cls: type, obj: object, what: str) -> dict:
    """Refuse a non-object, unknown fields and missing fields without a default."""
    if not isinstance(obj, dict):
        raise Malformed(f"{what} must be a JSON object, got {type(obj).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(obj) - set(names))
    if unknown:
        raise UnknownField(f"unknown {what} field {unknown[0]!r}")
    required = {n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(obj))
    if missing:
        raise MissingField(f"{what} lacks field {missing[0]!r}")
    return obj


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        # One configuration, one digest: alpha 32 and 32.0, or the modules in another
        # order, must not make the coordinator refuse an honest update as WrongBase.
        if isinstance(self.target_modules, str) or not all(isinstance(m, str) for m in self.target_modules):
            raise ValueError(f"target_modules must be a list of names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", tuple(sorted(self.target_modules)))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": sorted(self.target_modules)}

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_dict()))

    @classmethod
    def from_dict(cls, obj: dict) -> LoraSettings:
        obj = _check_fields(cls, obj, "lora settings")
        _check_bounded(cls, obj, LORA_BOUNDS, "lora")
        modules = obj.get("target_modules", ())
        if isinstance(modules, list) and (not modules or len(modules) > 256
                                          or not all(isinstance(m, str) and m for m in modules)):
            raise Malformed(f"lora target_modules: expected 1-256 module names, got {_shown(modules)}")
        try:
            return cls(**obj)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a 400-digit alpha
            raise Malformed(f"lora settings: {exc}") from None


@dataclass(frozen=True)
class TrainSettings:
    max_steps: int = 100
    max_minutes: float = 10.0
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seq_len: int = 128
    seed: int = 0
    keep_optimizer: bool = True
    """Carry AdamW's state and the warmup over from a volunteer's last round when it goes on from
    the global adapter its update went into (client.trainer.Carry)."""

    @classmethod
    def from_dict(cls, obj: dict) -> TrainSettings:
        obj = _check_fields(cls, obj, "train settings")
        _check_bounded(cls, obj, TRAIN_BOUNDS, "train")
        return cls(**obj)


@dataclass(frozen=True)
class RoundTask:
    project_id: str
    round: int
    nonce: str
    base_adapter_digest: str
    base_model_id: str
    base_model_revision: str
    mode: str
    lora: LoraSettings
    train: TrainSettings
    payload_dtype: str = "float32"
    max_payload_bytes: int = 64 << 20
    extra: dict = field(default_factory=dict)
    adapter_seed: int = 0
    """The project seed version 0's A factors come from: in `ffa` the task carries only the
    factors that train, and the volunteer regenerates the others from this seed."""
    downlink_dtype: str = "float32"
    """The dtype the global adapter's values are representable in (and travel in)."""
    base_version: int | None = None
    """async: the version the task trains from (`round` is then a serial number of tasks, not of
    versions); None in sync, where it is `round` - 1. Absent from the bytes when None."""

    def to_bytes(self) -> bytes:
        obj = asdict(self)
        obj["lora"] = self.lora.to_dict()
        if self.base_version is None:  # a sync task's bytes are what they were before the field
            del obj["base_version"]
        return canonical_json(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTask:
        obj = _check_fields(cls, parse_json(data, max_bytes=MAX_TASK_BYTES, what="round task"), "round task")
        obj["lora"] = LoraSettings.from_dict(obj["lora"])
        obj["train"] = TrainSettings.from_dict(obj["train"])
        task = cls(**obj)
        task._check_plain_fields()
        try:
            modes.get(task.mode)
        except KeyError:
            raise Malformed(f"round task mode {task.mode!r} not one of {modes.names()}") from None
        if not isinstance(task.payload_dtype, str) or task.payload_dtype not in DTYPES:
            raise Malformed(f"round task payload_dtype {task.payload_dtype!r} not one of {sorted(DTYPES)}")
        if not isinstance(task.downlink_dtype, str) or task.downlink_dtype not in DOWNLINK_DTYPES:
            raise Malformed(f"round task downlink_dtype {_shown(task.downlink_dtype)} not one of "
                            f"{list(DOWNLINK_DTYPES)}")
        seed = task.adapter_seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise Malformed(f"round task adapter_seed {_shown(seed)} must be an integer from 0 to {MAX_SEED}")
        for name in ("round", "base_version"):
            value = getattr(task, name)
            if name == "base_version" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_ROUND:
                raise Malformed(f"round task {name} {_shown(value)} must be an integer from 0 to {MAX_ROUND}")
        return task

    def _check_plain_fields(self) -> None:
        """Types and shapes of the fields that are not settings: what a hostile coordinator could bend."""
        if not isinstance(self.project_id, str) or not PROJECT_ID_RE.match(self.project_id):
            raise Malformed(f"round task project_id {_shown(self.project_id)}: expected 1-64 of "
                            "a-z 0-9 . _ - starting with a letter or digit")
        for name, longest in (("nonce", 128), ("base_model_id", 4096), ("base_model_revision", 256)):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > longest or (name != "base_model_revision"
                                                                      and not value):
                raise Malformed(f"round task {name}: expected a string of at most {longest} characters")
        digest = self.base_adapter_digest
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise Malformed("round task base_adapter_digest: expected 64 lowercase hex digits")
        _check_number("round task", "max_payload_bytes", self.max_payload_bytes, 0, PAYLOAD_BOUNDS)
        if not isinstance(self.extra, dict):
            raise Malformed("round task extra: expected an object")

    def claims(self) -> dict:
        """The manifest fields an update for this task must carry."""
        return {
            "project_id": self.project_id,
            "round": self.round,
            "nonce": self.nonce,
            "base_adapter_digest": self.base_adapter_digest,
            "base_model_id": self.base_model_id,
            "base_model_revision": self.base_model_revision,
            "lora_config_digest": self.lora.digest(),
            "payload_dtype": self.payload_dtype,
        }

