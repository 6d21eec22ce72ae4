"""What the coordinator asks of a volunteer in one round, as plain data.

The `RoundTask` travels as canonical JSON next to the global adapter bytes; the
volunteer trains to it and signs claims that echo it. `LoraSettings` is the
LoRA configuration both sides build their PEFT model from; its digest is
signed in every update so that factors trained under another configuration
are refused.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from loracommons.protocol import modes
from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.codec import DTYPES
from loracommons.protocol.envelope import sha256_hex
from loracommons.protocol.errors import Malformed, MissingField, UnknownField

MAX_TASK_BYTES = 64 * 1024


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

    @classmethod
    def from_dict(cls, obj: dict) -> TrainSettings:
        return cls(**_check_fields(cls, obj, "train settings"))


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

    def to_bytes(self) -> bytes:
        obj = asdict(self)
        obj["lora"] = self.lora.to_dict()
        return canonical_json(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTask:
        obj = _check_fields(cls, parse_json(data, max_bytes=MAX_TASK_BYTES, what="round task"), "round task")
        obj["lora"] = LoraSettings.from_dict(obj["lora"])
        obj["train"] = TrainSettings.from_dict(obj["train"])
        task = cls(**obj)
        try:
            modes.get(task.mode)
        except KeyError:
            raise Malformed(f"round task mode {task.mode!r} not one of {modes.names()}") from None
        if not isinstance(task.payload_dtype, str) or task.payload_dtype not in DTYPES:
            raise Malformed(f"round task payload_dtype {task.payload_dtype!r} not one of {sorted(DTYPES)}")
        if not isinstance(task.round, int) or isinstance(task.round, bool) or task.round < 0:
            raise Malformed(f"round task round {task.round!r} must be a non-negative integer")
        return task

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

