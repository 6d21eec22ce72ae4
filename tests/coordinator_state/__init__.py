"""Tests of the coordinator's state: SQLite store, blobs, signed releases, HTTP API.

`publish_n` builds a project folder with n consecutive releases of a small
random adapter, through the real `publish_release`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loracommons.coordinator.config import ProjectSection
from loracommons.coordinator.releases import publish_release
from loracommons.coordinator.store import Store
from loracommons.protocol.identity import SigningKey

PROJECT = {"id": "test-project", "name": "Test community", "base_model": "tiny/llama",
           "base_model_revision": "main", "mode": "ffa", "membership": "open"}
#: The same facts as the [project] table the coordinator reads (`publish_release` takes it).
SECTION = ProjectSection(id=PROJECT["id"], name=PROJECT["name"], base_model=PROJECT["base_model"],
                         base_model_revision=PROJECT["base_model_revision"])
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                  "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny/llama"}
PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def adapter(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{PREFIX}.lora_A.weight": rng.standard_normal((2, 8)).astype(np.float32),
            f"{PREFIX}.lora_B.weight": rng.standard_normal((8, 2)).astype(np.float32)}


def volunteer_fp(i: int) -> str:
    return f"{i:02x}" * 32


def publish_next(project_dir: Path, store: Store, key: SigningKey, round: int | None = None):
    latest = store.latest_release()
    version = (latest.version if latest else 0) + 1
    round = version if round is None else round
    return publish_release(
        project_dir, store, key, SECTION, version, round, adapter(version), ADAPTER_CONFIG,
        metrics={"train_loss": 2.0 / version, "eval_loss": 2.5 / version, "admitted": 3},
        update_digests=[f"{version:064x}", f"{version + 100:064x}"],
        contributors={volunteer_fp(1): 100 * version, volunteer_fp(2): 50},
    )


def publish_n(project_dir: Path, store: Store, key: SigningKey, n: int) -> list:
    return [publish_next(project_dir, store, key) for _ in range(n)]
