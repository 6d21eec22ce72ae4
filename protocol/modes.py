"""Aggregation modes: the one place that says what a mode means on the wire.

A mode names which LoRA factors a volunteer trains and sends, and how the
coordinator measures and folds them. Everything that depends on the mode asks
this registry (the volunteer's model setup, the task parser, the config, the
admission spec); the coordinator's `aggregation` module registers, per mode, the
`Aggregator` that folds it and the geometry its delta norm is taken in.

    ffa     A frozen at the project seed's initialization; B trained and sent.
            The mean of the B_i is exactly the mean of the ΔW_i.
    exact   A and B trained and sent; the coordinator re-factorizes the mean of B_i A_i.
    fedavg  A and B trained and sent, averaged separately (the common baseline).

Nested ranks (`Mode.nested_ranks`, ffa only): a volunteer of rank r_i <= r sends the r_i columns of
each B in its round's window (`protocol.lora.window_start`; `take_window` cuts an adapter to them).

Adding a mode: `register(Mode(...))` here (or in a plugin/test), an `Aggregator`
registered for its name on the coordinator, and tests. No torch, no flwr.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: PEFT's LoRA factor layer names, as they appear in saved tensor names (`...lora_A.weight`).
FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class Mode:
    """One aggregation mode, as both sides must agree on it."""

    name: str
    """Config and wire name (`[aggregation] mode`, `RoundTask.mode`)."""
    doc: str
    """One line for the project file and `--help`."""
    sends: tuple[str, ...]
    """Factor layers a volunteer trains and sends (an allowlist, like peft's `adapter_layer_names`);
    the others stay frozen at the global values."""
    norm: Literal["parameter", "product"] = "parameter"
    """Where an update's delta is measured: `parameter` = flattened sent tensors minus the
    global's; `product` = B_i A_i - B_g A_g per module (Frobenius)."""
    nested_ranks: bool = False
    """Whether a volunteer may train a smaller rank r_i <= r: a window of r_i columns of B against the
    same rows of A (`protocol.lora.window_start`), sending those columns alone. Sound only where A is
    frozen and shared (`ffa`): each column of B then multiplies the same row of A on every volunteer."""

    def __post_init__(self) -> None:
        if not self.sends or any(f not in FACTORS for f in self.sends):
            raise ValueError(f"mode {self.name!r}: sends must name factors among {FACTORS}, got {self.sends}")
        if self.norm not in ("parameter", "product"):
            raise ValueError(f"mode {self.name!r}: norm must be 'parameter' or 'product', got {self.norm!r}")

    def trains(self, factor: str) -> bool:
        """Whether a volunteer trains `factor` (`lora_A` or `lora_B`) in this mode."""
        return factor in self.sends

    def is_sent(self, tensor_name: str) -> bool:
        """Whether the adapter tensor `tensor_name` travels in an update of this mode."""
        return any(f".{factor}." in tensor_name for factor in self.sends)

    def sent_names(self, adapter_names: Iterable[str]) -> list[str]:
        """The adapter tensors an update of this mode carries, sorted."""
        return sorted(n for n in adapter_names if self.is_sent(n))


_REGISTRY: dict[str, Mode] = {}


def register(mode: Mode, *, replace: bool = False) -> Mode:
    """Add a mode; refuses a second mode of one name unless `replace`."""
    if mode.name in _REGISTRY and not replace:
        raise ValueError(f"mode {mode.name!r} is already registered")
    _REGISTRY[mode.name] = mode
    return mode


def unregister(name: str) -> None:
    """Remove a mode (tests that add a toy mode clean up with this)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered mode names, built-in ones first."""
    return tuple(_REGISTRY)


def get(name: str) -> Mode:
    """The mode called `name`; `KeyError` with the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise KeyError(f"mode {name!r} not one of {', '.join(_REGISTRY)}") from None


FFA = register(
    Mode("ffa", "mean of B, A frozen from the project seed (exact, half the upload)", ("lora_B",),
         nested_ranks=True)
)
EXACT = register(
    Mode("exact", "rank-r SVD of the mean of B_i A_i (both factors sent)", FACTORS, norm="product")
)
FEDAVG = register(Mode("fedavg", "A and B averaged separately (the common baseline)", FACTORS))
