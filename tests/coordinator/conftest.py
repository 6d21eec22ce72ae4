"""Builders for coordinator tests: small global adapters, volunteer updates, signed envelopes."""

from __future__ import annotations

import numpy as np
import pytest

from loracommons.coordinator.config import ProjectConfig
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.envelope import Envelope, sha256_hex, sign_update
from loracommons.protocol.identity import SigningKey

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}"


def make_global(
    rng: np.random.Generator, r: int = 4, layers: int = 2, hidden: int = 16, kv: int = 8, b_scale: float = 0.1
) -> dict[str, np.ndarray]:
    """A q_proj (hidden -> hidden) and v_proj (hidden -> kv) adapter per layer."""
    out = {}
    for i in range(layers):
        for module, out_dim in (("q_proj", hidden), ("v_proj", kv)):
            name = PREFIX.format(i=i, m=module)
            out[f"{name}.lora_A.weight"] = rng.normal(size=(r, hidden)).astype(np.float32) / np.sqrt(hidden)
            out[f"{name}.lora_B.weight"] = (b_scale * rng.normal(size=(out_dim, r))).astype(np.float32)
    return out


def make_update(global_tensors: dict, mode: str, rng: np.random.Generator, step: float = 0.05) -> dict:
    """What a volunteer sends after training: B moved (and A too outside ffa)."""
    out = {}
    for name, value in global_tensors.items():
        if ".lora_B." in name or mode != "ffa":
            out[name] = (value + step * rng.normal(size=value.shape)).astype(np.float32)
    return out


class Signer:
    """Signs updates for one round of one project."""

    def __init__(self, cfg: ProjectConfig, global_tensors: dict, round: int = 1, nonce: str = "ab" * 16):
        self.cfg, self.round, self.nonce = cfg, round, nonce
        self.global_tensors = global_tensors
        self.digest = sha256_hex(encode_tensors(global_tensors))
        self.task = cfg.task(round, nonce, self.digest)

    def envelope(
        self,
        tensors: dict,
        key: SigningKey | None = None,
        examples: int = 10,
        dtype: str | None = None,
        **claims,
    ) -> Envelope:
        key = key or SigningKey.generate()
        dtype = dtype or self.task.payload_dtype
        payload = encode_tensors(tensors, dtype=dtype)
        base = {
            **self.task.claims(),
            "payload_dtype": dtype,
            "examples": examples,
            "steps": 5,
            "train_loss": 1.5,
        }
        return sign_update(key, payload, **{**base, **claims})


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
