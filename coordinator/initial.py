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

log = logging.getLogger(__name__)

POINTER = "initial_adapter.json"
DEMO_MODEL_ID = "loracommons/demo-tiny"


def resolve_base_model(model_id: str) -> str:
    if model_id == DEMO_MODEL_ID:
        from loracommons.demo import base_model_path

        return str(base_model_path())
    return model_id


def build_initial_adapter(cfg: ProjectConfig) -> dict[str, np.ndarray]:
    """PEFT LoRA on the base model in float32 under the project seed; its adapter state."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(cfg.project.base_model)
    revision = cfg.project.base_model_revision
    kwargs = {"dtype": torch.float32}
    if not Path(path).exists():
        kwargs["revision"] = revision
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    lora = cfg.lora
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=sorted(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.project.seed)
        wrapped = get_peft_model(base, config)
    state = get_peft_model_state_dict(wrapped)
    return {name: t.detach().to("cpu", torch.float32).numpy().copy() for name, t in state.items()}


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
