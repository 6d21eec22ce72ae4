"""What the coordinator asks of a volunteer in one round, as plain data.

The `RoundTask` travels as canonical JSON next to the global adapter bytes; the
volunteer trains to it and signs claims that echo it. `LoraSettings` is the
LoRA configuration both sides build their PEFT model from; its digest is
signed in every update so that factors trained under another configuration
are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from loracommons.protocol.canonical import canonical_json, parse_json
from loracommons.protocol.envelope import sha256_hex
from loracommons.protocol.errors import Malformed, MissingField, UnknownField

MODES = ("ffa", "exact", "fedavg")
MAX_TASK_BYTES = 64 * 1024


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": sorted(self.target_modules)}

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_dict()))

    @classmethod
    def from_dict(cls, obj: dict) -> LoraSettings:
        return cls(**{**obj, "target_modules": tuple(obj["target_modules"])})


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

    def to_bytes(self) -> bytes:
        obj = asdict(self)
        obj["lora"] = self.lora.to_dict()
        return canonical_json(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTask:
        obj = parse_json(data, max_bytes=MAX_TASK_BYTES, what="round task")
        known = {f.name for f in fields(cls)}
        if set(obj) - known:
            raise UnknownField(f"unknown round task field {sorted(set(obj) - known)[0]!r}")
        try:
            obj["lora"] = LoraSettings.from_dict(obj["lora"])
            obj["train"] = TrainSettings.from_dict(obj["train"])
            task = cls(**obj)
        except KeyError as exc:
            raise MissingField(f"round task lacks {exc}") from None
        except TypeError as exc:
            raise Malformed(f"round task: {exc}") from None
        if task.mode not in MODES:
            raise Malformed(f"round task mode {task.mode!r} not one of {MODES}")
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


def update_tensor_names(adapter_names: list[str], mode: str) -> list[str]:
    """Which tensors of the global adapter an update carries: only B in `ffa`."""
    if mode == "ffa":
        return sorted(n for n in adapter_names if ".lora_B." in n)
    return sorted(n for n in adapter_names if ".lora_A." in n or ".lora_B." in n)
