"""The base model and the LoRA adapter around it, as a volunteer holds them across rounds.

One base model stays loaded for the life of the node (`load_base` caches it);
each round `apply_adapter` loads the global adapter's factors into one PEFT
wrapper kept on that base, and `extract_update` reads back the factors the
update carries. LoRA weights are never initialized here: version 0 comes from
the coordinator (`protocol.lora.init_adapter`), and the PEFT configuration is
`protocol.lora.lora_config`, the one both sides build. The mode registry
(`protocol.modes`) says which factors train and which travel.

    W x + (alpha / r) * B A x        A: r x in_features, B: out_features x r
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from loracommons.protocol import modes
from loracommons.protocol.lora import (
    hub_revision,
    lora_config,
    nested_settings,
    resolve_base_model,
    rolled,
    take_rank,
)
from loracommons.protocol.task import LoraSettings

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PAYLOAD_DTYPES = ("float32", "float16", "bfloat16")
_WRAPPER_ATTR = "_loracommons_peft"  # (PeftModel, LoraSettings) kept on the base module
_SLOTS_ATTR = "_loracommons_slots"  # PEFT saved name -> its parameter, kept on the wrapper
_REST_ATTR = "_loracommons_rest"  # a smaller rank's frozen-rest hooks (`_hold_rest`), kept on the wrapper


class ModelError(RuntimeError):
    """The base model or adapter cannot be set up as asked; the message says why."""


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` prefers CUDA, then MPS, then CPU; an explicit device must exist."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {spec}: CUDA is not available (torch {torch.__version__})")
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ModelError(f"--device {spec}: expected cuda:N with N a GPU number")
        index, count = int(index_text), torch.cuda.device_count()
        if index >= count:
            raise ModelError(f"--device {spec}: this machine has {count} CUDA device(s), 0..{count - 1}")
        return torch.device("cuda", index)
    raise ModelError(f"--device {spec!r}: expected one of {', '.join(DEVICE_CHOICES)}")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it, else float16 on CUDA; float32 elsewhere."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


_BASE_CACHE: dict[tuple, tuple[Any, Any]] = {}


def load_base(
    model_id: str,
    revision: str | None = None,
    device: torch.device | str = "auto",
    dtype: torch.dtype | None = None,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a base model, loaded once per process for the same arguments.

    Only one base stays cached: loading another releases the previous one.
    """
    device = pick_device(device) if isinstance(device, str) else device
    dtype = dtype or pick_dtype(device)
    path = resolve_base_model(model_id)
    revision = hub_revision(path, revision)
    key = (path, revision, str(device), str(dtype), load_in_4bit, gradient_checkpointing)
    if key in _BASE_CACHE:
        return _BASE_CACHE[key]
    clear_cache()
    if load_in_4bit:
        _check_4bit(device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "dtype": dtype}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0}
    log.info("loading base model %s (revision %s) on %s as %s", path, revision, device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        hint = " (HF_HUB_OFFLINE=1 is set: the model must be in the local cache)" if _offline() else ""
        raise ModelError(f"cannot load base model {model_id!r}{hint}: {exc}") from exc
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        # transformers declares `to` through functools.wraps, whose stub reads the device as `self`
        model.to(device)  # type: ignore[arg-type]
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # reentrant checkpointing needs inputs that require grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    model.eval()
    _BASE_CACHE[key] = (model, tokenizer)
    return model, tokenizer


def clear_cache() -> None:
    """Drop the cached base model (and its adapter wrapper) so its memory can be freed."""
    _BASE_CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def _check_4bit(device: torch.device) -> None:
    if device.type != "cuda":
        raise ModelError(f"4-bit loading (QLoRA) needs a CUDA GPU; the device is {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4-bit loading (QLoRA) needs the bitsandbytes package: pip install bitsandbytes")


def _wrapper(base: Any, settings: LoraSettings) -> PeftModel:
    """The one PEFT wrapper on `base` for `settings`, built on first use."""
    if isinstance(base, PeftModel):
        raise ModelError("apply_adapter expects the base model, not a PeftModel")
    held = getattr(base, _WRAPPER_ATTR, None)
    if held is not None and held[1] == settings:
        return held[0]
    if held is not None:  # the project changed its LoRA settings: strip the old layers
        held[0].unload()
        object.__delattr__(base, _WRAPPER_ATTR)
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten right away
        wrapped = get_peft_model(base, lora_config(settings))
    object.__setattr__(base, _WRAPPER_ATTR, (wrapped, settings))  # not a registered submodule
    return wrapped


def adapter_shapes(model: PeftModel) -> dict[str, tuple[int, ...]]:
    """Names (PEFT saved names) and shapes of every adapter tensor."""
    slots = getattr(model, _SLOTS_ATTR, None)  # found by copy_factors: the same names, no state dict walk
    if slots is not None:
        return {name: tuple(p.shape) for name, p in slots.items()}
    return {name: tuple(t.shape) for name, t in get_peft_model_state_dict(model).items()}


def apply_adapter(base: Any, settings: LoraSettings, tensors: dict[str, np.ndarray], mode: str) -> PeftModel:
    """The base wrapped with LoRA holding exactly `tensors`, ready to train in `mode`.

    The wrapper is built once per base and reused: each round only the factor
    values change, so nothing accumulates across rounds. In ``ffa`` mode A is
    frozen; otherwise A and B train (`Mode.trains`).
    """
    trains = _mode(mode).trains
    model = _wrapper(base, settings)
    expected = adapter_shapes(model)
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ModelError(
            f"global adapter does not fit this base model and LoRA settings: "
            f"unexpected {extra[:2]}, missing {missing[:2]}"
        )
    for name, shape in expected.items():
        if tuple(np.shape(tensors[name])) != shape:
            raise ModelError(
                f"global adapter tensor {name!r} has shape {np.shape(tensors[name])}, expected {shape}"
            )
    if not copy_factors(model, tensors):
        state = {name: torch.from_numpy(np.array(value, dtype=np.float32)) for name, value in tensors.items()}
        # peft returns torch's `_IncompatibleKeys`, a namedtuple its annotations leave untyped
        unexpected: list[str] = set_peft_model_state_dict(model, state).unexpected_keys  # type: ignore[attr-defined]
        if unexpected:
            raise ModelError(f"PEFT did not place adapter tensors {unexpected[:2]}")
    for name, param in model.named_parameters():
        factor = next((f for f in modes.FACTORS if f".{f}." in name), None)
        param.requires_grad_(factor is not None and trains(factor))
        param.grad = None
    return model


def copy_factors(model: PeftModel, tensors: dict[str, np.ndarray]) -> bool:
    """Copy `tensors` (PEFT saved names, shapes already checked) into the wrapper's own parameters.

    The round's re-apply: PEFT's `set_peft_model_state_dict` renames keys and loads a state dict
    over the whole model every round (tens of ms on a small base); the factors' parameters do not
    change while the wrapper lives, so they are found once (by shared storage) and copied into.
    False when a name has no parameter of its own (the caller then loads through PEFT).
    """
    slots: dict[str, torch.nn.Parameter] | None = getattr(model, _SLOTS_ATTR, None)
    if slots is None:
        by_storage = {p.data_ptr(): p for p in model.parameters()}
        found = {name: by_storage.get(t.data_ptr()) for name, t in get_peft_model_state_dict(model).items()}
        slots = {name: p for name, p in found.items() if p is not None}
        if len(slots) != len(found) or len({id(p) for p in slots.values()}) != len(slots):
            return False
        object.__setattr__(model, _SLOTS_ATTR, slots)  # not a registered submodule
    if set(tensors) != set(slots):
        return False
    with torch.no_grad():
        for name, value in tensors.items():
            slots[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    return True


def extract_update(model: PeftModel, mode: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The tensors an update carries (`Mode.sent_names`), rounded to the payload dtype.

    ``float16`` comes back as float16 arrays; ``bfloat16`` as float32 arrays holding
    bfloat16-representable values (numpy has no bfloat16; the codec narrows them exactly).
    """
    sent_names = _mode(mode).sent_names
    if dtype not in PAYLOAD_DTYPES:
        raise ModelError(f"payload dtype {dtype!r} not one of {', '.join(PAYLOAD_DTYPES)}")
    state = get_peft_model_state_dict(model)
    out = {}
    for name in sent_names(state):
        tensor = state[name].detach().to("cpu")
        if dtype == "float16":
            out[name] = tensor.to(torch.float16).numpy().copy()
        else:
            out[name] = tensor.to(getattr(torch, dtype)).to(torch.float32).numpy().copy()
    return out



# ---------------------------------------------------------------- nested ranks (ffa)

RANK_MEMORY_SHARE = 0.5
"""Share of the device's free memory (after the base model is loaded) the LoRA layers of one
rank may take in `affordable_rank`'s estimate; the rest is left to activations and fragmentation."""


def apply_adapter_at_rank(
    base: Any, settings: LoraSettings, tensors: dict[str, np.ndarray], mode: str, rank: int,
    start: int = 0,
) -> PeftModel:
    """`apply_adapter` for a volunteer of rank `rank` <= r (nested ranks, `Mode.nested_ranks`).

    The trainable PEFT layers are built at rank `rank` with alpha * rank / r
    (`protocol.lora.nested_settings`: the same alpha / r scale as the project's) and hold the window of
    `rank` components from `start` (`protocol.lora.window_start`). Below, the adapter is taken rolled
    to `start`, so the window is A[:rank, :] and B[:, :rank]; the other components, A[rank:, :] and
    B[:, rank:], are a frozen term added to each adapted layer's output (`_hold_rest`). The forward
    pass is thus the whole global adapter: the volunteer trains its columns in the model the community
    has (not in a truncated one, which would pull the shared columns away from what the full ranks
    learn with every component present), and can score that model. `extract_update` returns
    B[:, :rank], the window's columns in window order: what the update carries.
    Memory: the frozen factors only (no gradients, no optimizer state, no saved activations: the
    backward pass through a frozen linear needs its weight only), so training costs rank `rank`.
    """
    if rank == settings.r:
        return apply_adapter(base, settings, tensors, mode)
    if not _mode(mode).nested_ranks:
        raise ModelError(f"mode {mode!r} trains only the project's rank {settings.r}, not rank {rank}")
    try:
        narrow = nested_settings(settings, rank)
    except ValueError as exc:
        raise ModelError(str(exc)) from None
    tensors = rolled(tensors, start)
    cut = {name: np.ascontiguousarray(value) for name, value in take_rank(tensors, rank).items()}
    model = apply_adapter(base, narrow, cut, mode)
    _hold_rest(model, tensors, rank, settings.alpha / settings.r)
    return model


def _hold_rest(model: PeftModel, tensors: dict[str, np.ndarray], rank: int, scale: float) -> None:
    """Add scale * B[:, rank:] A[rank:, :] x, frozen, to each adapted layer's output (a forward hook).

    Each round replaces the previous round's hooks (the warm wrapper is reused, `_wrapper`); a wrapper
    rebuilt for other settings drops them with its layers. The factors are plain tensors held by the
    hook, not parameters or buffers: the state dict, `copy_factors` and the optimizer never see them.
    """
    for handle in getattr(model, _REST_ATTR, ()):
        handle.remove()
    modules = dict(model.named_modules())
    handles = []
    for name, a in tensors.items():
        if not name.endswith(".lora_A.weight") or a.shape[0] <= rank:
            continue
        prefix = name[: -len(".lora_A.weight")]
        layer = modules.get(prefix) or modules.get(prefix.removeprefix("base_model.model."))
        b = tensors.get(f"{prefix}.lora_B.weight")
        if layer is None or b is None:
            raise ModelError(f"no adapted layer for global adapter tensor {name!r}")
        like = next(p for n, p in layer.named_parameters() if ".lora_A." in f".{n}")
        a_rest = torch.from_numpy(np.array(a[rank:], dtype=np.float32)).to(like.device, like.dtype)
        b_rest = torch.from_numpy(np.array(b[:, rank:], dtype=np.float32)).to(like.device, like.dtype)
        handles.append(layer.register_forward_hook(_rest_hook(a_rest, b_rest, scale)))
    object.__setattr__(model, _REST_ATTR, handles)  # not a registered submodule


def _rest_hook(a_rest: torch.Tensor, b_rest: torch.Tensor, scale: float) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a_rest.dtype)
        rest = torch.nn.functional.linear(torch.nn.functional.linear(x, a_rest), b_rest) * scale
        return output + rest.to(output.dtype)

    return hook


def rank_bytes(base: Any, settings: LoraSettings, batch_tokens: int) -> int:
    """Estimated training memory of one LoRA rank component on `base` (bytes).

    Per targeted linear layer: (in + out) numbers for the factors, their gradients and AdamW's two
    moments in float32 (16 bytes each: an upper bound, A is frozen in ffa), plus the activation A x
    kept for the backward pass (`batch_tokens` numbers, 4 bytes). Activations of the base model
    itself do not depend on the rank and are not counted.
    """
    targets = set(settings.target_modules)
    total = 0
    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            total += 16 * (module.in_features + module.out_features) + 4 * batch_tokens
    return total


def affordable_rank(free_bytes: int, per_rank: int, r: int) -> int:
    """The largest of r, r/2, r/4, ..., 1 whose LoRA memory (`per_rank` x rank) fits in
    `RANK_MEMORY_SHARE` of `free_bytes`; 1 when none does (training may then still run out)."""
    rank = r
    while rank > 1 and rank * per_rank > RANK_MEMORY_SHARE * free_bytes:
        rank //= 2
    return max(rank, 1)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (None elsewhere: CPU and MPS share the host's memory)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _mode(name: str) -> modes.Mode:
    try:
        return modes.get(name)
    except KeyError as exc:
        raise ModelError(str(exc.args[0])) from None
