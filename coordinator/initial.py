"""Version 0 of a project's global adapter: A from the project seed, B zero.

Made once, the first time a project starts, and kept as a blob whose digest is
recorded in `DIR/initial_adapter.json`. Every volunteer receives this A, so in
`ffa` mode the frozen factors are bit-identical everywhere by construction.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from loracommons.coordinator.config import ProjectConfig
from loracommons.coordinator.store import Store
from loracommons.protocol.codec import decode_tensors, encode_tensors
from loracommons.protocol.durable import atomic_write
from loracommons.protocol.lora import initial_adapter_for

log = logging.getLogger(__name__)

POINTER = "initial_adapter.json"


def build_initial_adapter(cfg: ProjectConfig) -> dict[str, np.ndarray]:
    """`protocol.lora.init_adapter` on the project's base model, loaded in float32."""
    return initial_adapter_for(cfg.project.base_model, cfg.project.base_model_revision, cfg.lora,
                               cfg.project.seed)


def initial_adapter(project_dir: Path, cfg: ProjectConfig, store: Store) -> bytes:
    """The version-0 adapter bytes, created on first use."""
    pointer = project_dir / POINTER
    if pointer.exists():
        digest = json.loads(pointer.read_text())["sha256"]
        return store.blobs.get(digest)
    log.info("creating the initial adapter on %s (seed %d)", cfg.project.base_model, cfg.project.seed)
    data = encode_tensors(build_initial_adapter(cfg))
    digest = store.blobs.put(data)
    atomic_write(pointer, json.dumps({"sha256": digest}).encode())
    return data


def decode_adapter(data: bytes) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in decode_tensors(data, max_bytes=len(data)).items()}
