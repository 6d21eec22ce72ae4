"""LoRA setup both sides share: which base model, which PEFT config, version 0 of the adapter.

The coordinator and every volunteer must build bit-identical LoRA layers, so the
PEFT configuration, the base model id's resolution and the version-0 adapter
are made here once: `lora_config` is the one `LoraConfig` of a project,
`init_adapter` the one version 0 (A from the project seed, B zero), and
`peft_adapter_config` the `adapter_config.json` a release ships.

torch, peft and transformers are imported inside the functions that use them,
never at import time: protocol is also installed by downloaders without them
(tests/download checks that a download imports none of them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loracommons.protocol.canonical import plain_json
from loracommons.protocol.task import LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig

#: The embedded demo base model's id: it names no hub repository (`resolve_base_model`).
DEMO_MODEL_ID = "loracommons/demo-tiny"


def resolve_base_model(model_id: str) -> str:
    """Hub id or local folder to load; the demo id maps to the model shipped in the package."""
    if model_id == DEMO_MODEL_ID:
        from loracommons.demo import base_model_path

        return str(base_model_path())
    return model_id


def hub_revision(path: str, revision: str | None) -> str | None:
    """The revision to hand `from_pretrained` for `path`: none for a local folder or an empty pin."""
    if not revision or Path(path).exists():
        return None
    return revision


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The project's PEFT configuration, identical on the coordinator and every volunteer."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        # peft's stub says int, but it stores the value as given and scales by alpha / r in float;
        # alpha stays a float so that adapter_config.json keeps the project's value (8.0, 2.5).
        lora_alpha=settings.alpha,  # type: ignore[arg-type]
        lora_dropout=settings.dropout,
        target_modules=sorted(settings.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def init_adapter(base_model: Any, settings: LoraSettings, seed: int) -> dict[str, np.ndarray]:
    """Version 0 of a global adapter: A kaiming-initialized from `seed`, B zero, float32.

    `base_model` must carry no LoRA layers and gets none back (its parameters stay
    as they were). Load it in float32 so that A is not rounded to the base's dtype.
    The CPU random state is left as it was.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    if any("lora_A" in name for name, _ in base_model.named_modules()):
        raise ValueError("init_adapter needs a base model without LoRA layers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = get_peft_model(base_model, lora_config(settings))
    try:
        state = get_peft_model_state_dict(wrapped)
        return {name: t.detach().to("cpu", torch.float32).numpy().copy() for name, t in state.items()}
    finally:
        wrapped.unload()


def nested_settings(settings: LoraSettings, rank: int) -> LoraSettings:
    """The LoRA settings of a volunteer that trains rank `rank` <= r (nested ranks).

    peft scales B A by alpha / r. The volunteer's layers hold the first `rank` components,
    B[:, :rank] A[:rank], and must keep the project's scale, so its alpha is alpha * rank / r:
    (alpha * rank / r) / rank = alpha / r, and its ΔW is exactly those components' part of the
    project's ΔW."""
    if not 1 <= rank <= settings.r:
        raise ValueError(f"rank {rank} is outside 1..{settings.r} (the project's rank)")
    if rank == settings.r:
        return settings
    return replace(settings, r=rank, alpha=settings.alpha * rank / settings.r)


def take_rank(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Views of the first `rank` components of an adapter: B[:, :rank] and A[:rank, :] (no copy)."""
    out = {}
    for name, value in tensors.items():
        if ".lora_B." in name:
            out[name] = value[..., :rank]
        elif ".lora_A." in name:
            out[name] = value[:rank]
        else:
            out[name] = value
    return out


def window_start(round_: int, rank: int, r: int, signer: str = "") -> int:
    """The first component of the window a rank-`rank` volunteer trains in round `round_` (nested ranks).

    The window is the `rank` components start, start + 1, ... (mod r), and rolls on by one each round:
    start = (round + s) mod r below the project's rank r (over r rounds every component is a first one
    once, so a skill only small volunteers hold reaches every row of A, not its first `rank`: FedRolex's
    rolling sub-models), 0 at rank r. s = the signer's fingerprint (hex) as a number: volunteers' windows
    are staggered, so small volunteers share fewer columns with each other. Both sides compute it from
    the round the task and the update sign and from the signing key."""
    if not 0 < rank < r:
        return 0
    return (round_ + (int(signer[:8], 16) if signer else 0)) % r


def window_columns(start: int, rank: int, r: int) -> np.ndarray:
    """The components of a window (`window_start`), in the order the volunteer holds them."""
    return (start + np.arange(rank)) % r


def rolled(tensors: Mapping[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
    """The adapter with its components reordered to start at `start` (A's rows, B's columns, rolled
    alike: ΔW is unchanged); the tensors themselves at start 0."""
    if start == 0:
        return dict(tensors)
    out = {}
    for name, value in tensors.items():
        if ".lora_B." in name:
            out[name] = np.roll(value, -start, axis=-1)
        elif ".lora_A." in name:
            out[name] = np.roll(value, -start, axis=0)
        else:
            out[name] = value
    return out


def take_window(tensors: Mapping[str, np.ndarray], rank: int, start: int) -> dict[str, np.ndarray]:
    """The `rank` components of the window at `start` (`window_start`), in window order: `take_rank`
    of the adapter rolled to `start` (views at start 0; otherwise copies of those components only)."""
    if start == 0:
        return take_rank(tensors, rank)
    out = {}
    for name, value in tensors.items():
        if ".lora_B." in name:
            out[name] = np.take(value, window_columns(start, rank, value.shape[-1]), axis=-1)
        elif ".lora_A." in name:
            out[name] = np.take(value, window_columns(start, rank, value.shape[0]), axis=0)
        else:
            out[name] = value
    return out


def initial_adapter_for(model_id: str, revision: str | None, settings: LoraSettings,
                        seed: int) -> dict[str, np.ndarray]:
    """`init_adapter` on `model_id` loaded in float32 on the CPU: version 0 as the coordinator
    makes it, and as an `ffa` volunteer regenerates its frozen A (the same call on both sides)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_base_model(model_id)
    revision = hub_revision(path, revision)
    base = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=torch.float32)
    return init_adapter(base, settings, seed)


def peft_adapter_config(lora: LoraSettings, base_model: str, revision: str | None = None) -> dict:
    """`adapter_config.json` content for `lora`, as `PeftModel.save_pretrained` writes it."""
    out = lora_config(lora).to_dict()
    out["base_model_name_or_path"] = base_model
    out["revision"] = revision or None
    out["inference_mode"] = True
    return {key: plain_json(value) for key, value in out.items()}

