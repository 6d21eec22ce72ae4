"""The round's robust rules, one small class each, composed by `RoundAggregator`.

Like Flower's strategy wrappers (DifferentialPrivacyServerSideFixedClipping, Krum,
FedTrimmedAvg ...), each rule adds one behaviour on top of the plain weighted mean,
and the configuration picks which ones run. A rule says

    configured(cfg)   whether the project turned it on
    validate(cfg)     ConfigError naming the key and value where it would silently do nothing
    buffers           whether it needs every update of the round held until the end
    scale(norm)       a fixed clip bound's scale of one update: as it arrives when streaming, and
                      as the starting scale of each held update when buffering (never skipped)
    apply(tally, ..)  at the end, before folding: reject, re-scale or combine the held updates
    finish(..)        after folding: change the new tensors (noise), return metrics

Rules run in the order of `RULES`: free riders, Multi-Krum (these reject), median
clipping, trimmed mean (these act only when `min_volunteers` updates remain), central DP.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from loracommons.coordinator import privacy
from loracommons.coordinator.config import ProjectConfig, config_error
from loracommons.coordinator.robust import HeldUpdates, clip_scale, multi_krum, trimmed_mean_deltas
from loracommons.protocol import modes
from loracommons.protocol.errors import Reason


@dataclass(frozen=True)
class Rejection:
    """An admitted update the round's rules excluded at the end (free rider, Krum outlier)."""

    update_digest: str
    signer: str
    reason: str
    message: str


@dataclass(frozen=True)
class Held:
    """One admitted update waiting for the end of the round (its tensors are in `HeldUpdates`)."""

    digest: str
    signer: str
    weight: float
    norm: float
    start: int = 0
    """Where a smaller rank's window of columns begins (`protocol.lora.window_start`)."""


@dataclass(frozen=True)
class Tally:
    """The held round as the rules see it; each rule returns a new one."""

    kept: tuple[Held, ...]
    scales: tuple[float, ...]  # clip scale of each kept update
    rejected: tuple[Rejection, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    delta: Mapping[str, np.ndarray] | None = None  # a rule's own combination of the kept deltas
    why_none: str = ""  # when a rule leaves nothing to aggregate: why, for the round's note

    def keep(self, kept: list[Held], rejected: list[Rejection]) -> Tally:
        """Keep only `kept` (scales follow), adding `rejected`."""
        scale = dict(zip((h.digest for h in self.kept), self.scales, strict=True))
        return replace(
            self,
            kept=tuple(kept),
            scales=tuple(scale[h.digest] for h in kept),
            rejected=(*self.rejected, *rejected),
        )

    def with_metrics(self, **metrics: float) -> Tally:
        return replace(self, metrics={**self.metrics, **metrics})


@dataclass(frozen=True)
class HeldView:
    """Read access to the held tensors for rules that look at more than norms."""

    held: HeldUpdates
    names: list[str]  # the tensors an update carries
    global_tensors: Mapping[str, np.ndarray]


class Rule:
    """One robust rule (see the module doc); the base class does nothing."""

    buffers: ClassVar[bool] = True
    needs_quorum: ClassVar[bool] = False
    """Acts only when at least `min_volunteers` updates remain (otherwise nothing is aggregated)."""
    uniform_weights: ClassVar[bool] = False
    """Every update weighs 1, whatever examples it reports."""
    nested_ranks: ClassVar[bool] = True
    """Whether it is defined on updates of a rank below the project's (nested ranks, ffa): rules
    that compare norms are (the norm is scaled to the project's rank, see `RoundAggregator`); rules
    that compare or noise coordinates across updates are not, and admission refuses such updates."""

    def __init__(self, cfg: ProjectConfig) -> None:
        self.cfg = cfg

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        """Raise ConfigError where this rule, configured, would do nothing or contradict another setting."""

    def scale(self, norm: float) -> float:
        return 1.0

    def apply(self, tally: Tally, view: HeldView) -> Tally:
        return tally

    def finish(
        self, tensors: dict[str, np.ndarray], names: list[str], aggregated: int, rng: np.random.Generator
    ) -> dict[str, float]:
        return {}


def _median(held: tuple[Held, ...] | list[Held]) -> float:
    return float(np.median([h.norm for h in held]))


def _lower_median(held: tuple[Held, ...]) -> float:
    """The median norm, the lower middle one for an even count: with two updates the smaller, so
    one oversized update cannot raise its own bound (the mean of the middle two would let it)."""
    norms = sorted(h.norm for h in held)
    return norms[(len(norms) - 1) // 2]


class FreeRiders(Rule):
    """Reject deltas far below the round's median norm: a volunteer that did not train."""

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        return cfg.aggregation.free_rider_ratio > 0

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        if cfg.round.min_volunteers < 2:
            raise config_error(
                "aggregation",
                "free_rider_ratio",
                cfg.aggregation.free_rider_ratio,
                "one update is always its own median; needs min_volunteers >= 2",
            )
        if cfg.privacy.dp:
            # The floor is a median of every update's norm: one volunteer's data decides whether
            # another's update counts, which the Gaussian mechanism's accounting does not cover.
            raise config_error(
                "aggregation",
                "free_rider_ratio",
                cfg.aggregation.free_rider_ratio,
                "cannot be combined with [privacy] dp: the round median it compares against depends "
                "on every volunteer's data, so the reported epsilon would understate the privacy loss",
            )

    def apply(self, tally: Tally, view: HeldView) -> Tally:
        ratio = self.cfg.aggregation.free_rider_ratio
        median = _median(tally.kept)
        floor = ratio * median
        message = "delta norm {:.4g} is below {} x the round median {:.4g}"
        rejected = [
            Rejection(h.digest, h.signer, Reason.FREE_RIDER, message.format(h.norm, ratio, median))
            for h in tally.kept
            if h.norm < floor
        ]
        return tally.keep([h for h in tally.kept if h.norm >= floor], rejected)


class MultiKrum(Rule):
    """Drop the f updates farthest from the others (Blanchard et al. 2017)."""

    nested_ranks = False  # distances between updates of different widths are not defined

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        return cfg.aggregation.robust == "krum"

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        f, low = cfg.aggregation.krum_f, cfg.round.min_volunteers
        if f < 1:
            raise config_error("aggregation", "krum_f", f, "krum with f = 0 keeps every update")
        if low <= 2 * f + 2:
            raise config_error(
                "aggregation",
                "krum_f",
                f,
                f"krum needs more than 2f+2 = {2 * f + 2} updates; min_volunteers = {low}",
            )

    def apply(self, tally: Tally, view: HeldView) -> Tally:
        f = self.cfg.aggregation.krum_f
        if len(tally.kept) <= 2 * f + 2:  # Krum cannot run: aggregate nothing rather than unprotected
            return replace(
                tally.keep([], []), why_none=f"; Multi-Krum with f = {f} needs more than {2 * f + 2} updates"
            )
        kept = set(multi_krum(view.held, [h.digest for h in tally.kept], view.names, view.global_tensors, f))
        message = f"among the {f} updates farthest from the others (Multi-Krum)"
        rejected = [
            Rejection(h.digest, h.signer, Reason.KRUM_OUTLIER, message)
            for h in tally.kept
            if h.digest not in kept
        ]
        return tally.keep([h for h in tally.kept if h.digest in kept], rejected)


class MedianClip(Rule):
    """Scale down deltas above clip_factor x the (lower) median norm of the kept updates."""

    needs_quorum = True

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        return cfg.aggregation.clip == "median"

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        low = cfg.round.min_volunteers
        if low < 2:
            raise config_error(
                "aggregation",
                "clip",
                cfg.aggregation.clip,
                f"one update is always its own median: bounds nothing; min_volunteers = {low}",
            )

    def apply(self, tally: Tally, view: HeldView) -> Tally:
        bound = self.cfg.aggregation.clip_factor * _lower_median(tally.kept)
        scales = tuple(s * clip_scale(h.norm, bound) for h, s in zip(tally.kept, tally.scales, strict=True))
        return replace(tally, scales=scales).with_metrics(clip_bound=bound)


class TrimmedMean(Rule):
    """Coordinate-wise mean of the deltas without the trim lowest and highest values (unweighted)."""

    needs_quorum = True
    nested_ranks = False  # trimming per column over a varying set of updates: not built

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        return cfg.aggregation.robust == "trimmed_mean"

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        agg, low = cfg.aggregation, cfg.round.min_volunteers
        if modes.get(agg.mode).norm == "product":
            raise config_error(
                "aggregation",
                "robust",
                agg.robust,
                f"not defined for mode = {agg.mode!r} (trimming factors coordinate-wise is not a mean of "
                "B_i A_i); use krum or clip",
            )
        if math.floor(agg.trim_fraction * low) < 1:
            raise config_error(
                "aggregation",
                "trim_fraction",
                agg.trim_fraction,
                f"trims floor({agg.trim_fraction} x {low}) = 0 updates at min_volunteers = {low}: "
                "trimmed_mean would do nothing",
            )

    def apply(self, tally: Tally, view: HeldView) -> Tally:
        trim = math.floor(self.cfg.aggregation.trim_fraction * len(tally.kept))
        keys = [h.digest for h in tally.kept]
        delta = trimmed_mean_deltas(
            view.held, keys, view.names, view.global_tensors, trim, list(tally.scales)
        )
        return replace(tally, delta=delta).with_metrics(trimmed_per_side=float(trim))


class CentralDP(Rule):
    """Central differential privacy: each delta clipped to a fixed bound, Gaussian noise on the mean."""

    buffers = False
    uniform_weights = True  # each volunteer's sensitivity is the same
    nested_ranks = False  # a column trained by n_j < N volunteers would need noise scaled to 1/n_j

    @classmethod
    def configured(cls, cfg: ProjectConfig) -> bool:
        return cfg.privacy.dp

    @classmethod
    def validate(cls, cfg: ProjectConfig) -> None:
        agg = cfg.aggregation
        if modes.get(agg.mode).norm == "product":
            usable = " or ".join(m for m in modes.names() if modes.get(m).norm == "parameter")
            raise config_error(
                "privacy", "dp", True, f"not supported with mode = {agg.mode!r} (use {usable})"
            )
        if agg.robust != "none":
            raise config_error("privacy", "dp", True, f"cannot be combined with robust = {agg.robust!r}")
        if agg.clip != "none":
            raise config_error(
                "privacy",
                "dp",
                True,
                "clips to [privacy] clip_norm; a median bound depends on private data: set clip = 'none'",
            )

    def scale(self, norm: float) -> float:
        return clip_scale(norm, self.cfg.privacy.clip_norm)

    def finish(
        self, tensors: dict[str, np.ndarray], names: list[str], aggregated: int, rng: np.random.Generator
    ) -> dict[str, float]:
        dp = self.cfg.privacy
        std = dp.noise_multiplier * dp.clip_norm / aggregated
        privacy.add_gaussian_noise(tensors, names, std, rng)
        return {"dp_noise_std": std}


RULES: tuple[type[Rule], ...] = (FreeRiders, MultiKrum, MedianClip, TrimmedMean, CentralDP)
"""Every rule, in the order a round applies them."""


def configured(cfg: ProjectConfig) -> list[Rule]:
    """The rules `cfg` turns on, in order."""
    return [rule(cfg) for rule in RULES if rule.configured(cfg)]


_SETTING = {MultiKrum: "robust = 'krum'", TrimmedMean: "robust = 'trimmed_mean'", CentralDP: "[privacy] dp"}
"""The project setting that turns on each rule that refuses smaller ranks, as a message names it."""


def nested_ranks_refusal(cfg: ProjectConfig) -> str:
    """Why this project cannot fold an update of a rank below its own ("" when it can)."""
    mode = cfg.aggregation.mode
    if not modes.get(mode).nested_ranks:
        nested = ", ".join(m for m in modes.names() if modes.get(m).nested_ranks)
        return f"mode = {mode!r} folds only the project's rank (nested ranks: {nested})"
    refusing = [rule for rule in RULES if rule.configured(cfg) and not rule.nested_ranks]
    if refusing:
        return f"{_SETTING[refusing[0]]} is not defined on updates of a smaller rank"
    return ""


def validate(cfg: ProjectConfig) -> None:
    """ConfigError for the first configured rule that would silently do nothing."""
    for rule in RULES:
        if rule.configured(cfg):
            rule.validate(cfg)


def protections(cfg: ProjectConfig) -> list[str]:
    """One line per setting that bounds what a single volunteer's update can do, and a warning line
    (starting "unprotected") where nothing bounds an update's size: `coordinator init` prints these."""
    agg, dp = cfg.aggregation, cfg.privacy
    lines = [
        "membership open: any key may send updates"
        if cfg.project.membership == "open"
        else "membership allowlist: only registered keys may send updates"
    ]
    if agg.clip == "median":
        lines.append(
            f"clip = median: deltas above {agg.clip_factor:g} x the round's median norm are scaled down "
            "to it (a x100 update counts as a normal one)"
        )
    if dp.dp:
        lines.append(f"dp: every delta is clipped to clip_norm = {dp.clip_norm:g}, noise on the mean")
    if agg.robust != "none":
        lines.append(f"robust = {agg.robust}: outlying updates (or coordinates) are dropped")
    if agg.max_norm > 0:
        lines.append(f"max_norm = {agg.max_norm:g}: larger deltas are rejected at admission")
    cap = agg.max_examples_weight
    weight = "every update weighs 1 under dp" if dp.dp else f"a claim of more examples counts as {cap:,}"
    lines.append(f"max_examples_weight = {cap:,}: {weight} (claims are unverifiable)")
    bounded = agg.clip != "none" or dp.dp or agg.robust != "none" or agg.max_norm > 0
    if not bounded:
        who = "any key" if cfg.project.membership == "open" else "one registered key"
        lines.append(
            f"unprotected: nothing bounds an update's size; {who} can replace the model "
            "(set clip = 'median' with min_volunteers >= 2, or max_norm)"
        )
    return lines
