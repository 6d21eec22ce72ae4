"""Aggregation: fold admitted updates into the next global adapter, one update at a time.

Modes (ΔW = alpha/r · B @ A; every mode returns A and B for every module):

    ffa      B' = Σ w_i B_i / Σ w_i exactly; A passed through from the global (frozen)
    exact    B' A' = rank-r truncated SVD of Σ w_i B_i A_i / Σ w_i, split B' = U √S, A' = √S Vᵀ
    fedavg   A' and B' averaged separately (the common baseline; not the mean of the ΔW_i)

Nested ranks (ffa only; `Mode.nested_ranks`). A volunteer of rank r_i < r trains a window of r_i
components, the columns K_i = {t, t + 1, ..., t + r_i - 1} (mod r) of B against the same rows of the
shared, frozen A, t = (the update's signed round + s_i) mod r, s_i from the signer's fingerprint
(`protocol.lora.window_start`: the window rolls on by one each round, FedRolex's rolling sub-models,
from a place of each volunteer's own), and sends B_i[:, K_i] in that order. With
peft's scaling the volunteer's alpha is alpha r_i / r (`protocol.lora.nested_settings`), so
its ΔW_i = (alpha/r) Σ_{j∈K_i} B_i[:, j] A[j, :]: r_i rank-one components of the project's ΔW, on
the same A rows as everyone else. Column j of the new B is a weighted mean over S_j = {i : j ∈ K_i},
the volunteers who trained it, with weights v_i = w_i f_i:

    B'[:, j] = Σ_{i∈S_j} v_i B_i[:, j] / V_j,   V_j = Σ_{i∈S_j} v_i        (V_j > 0)
    B'[:, j] = B_g[:, j]                                                     (V_j = 0: nobody trained it)

so (alpha/r) B'[:, j] A[j, :] is exactly the v-weighted mean of component j over those who trained
it. `[aggregation] nested_weighting` chooses f_i:

    rank     f_i = r / r_i (default)   every volunteer's weights summed over its columns, r_i f_i w_i =
                                        r w_i, are what they would be at rank r
    trained  f_i = 1                   the plain mean over those who trained the column
    mass     f_i = r / r_i, and V_j replaced by Σ_i w_i over the whole round (not a mean: a column's
             weights sum to Σ_{S_j} v_i / Σ_i w_i, above 1 in the low columns, below 1 in the high ones)

With every r_i = r, f_i = 1 and V_j = Σ_i w_i: each is the plain mean above, bit for bit. Why f_i:
A is frozen and random, so each column of B is its own direction, and with Adam a volunteer's
delta moves each of its parameters about alike: under `trained` a skill held by a rank-4 volunteer
alone reaches the new B through 4 columns at 1/N weight where at rank 16 it had 16, while the columns
only large volunteers train are averaged over few of them (quality bench, ranks {4, 4, 8, 8, 16, 16},
one skill each, 30 rounds x 10 steps, held-out loss against all at 16; on the first r_i columns, seeds
0 / 1: `trained` +53% / +57%, `rank` +29% / +39%, `mass` +12% / +3%; with the windows rolling from
each volunteer's own place: `rank` +8% / +5%, `mass` +5% / +0.2%, `trained` +27% (seed 0);
bench/README.md). `rank` is the default although `mass`
measured better: it keeps each column a convex mean (no column moves further than its trainers'
deltas, so a clip bound still bounds every column's move) and a community all at one rank r_i < r
gets the plain mean; `mass` makes the total move per volunteer equal by extrapolating the low
columns (here their weights sum to 7/3; a community all at rank 1 would move column 0 by r times the
mean delta).
(Counting the untrained columns as "no change" instead would give the mean of the ΔW_i, which
shrinks column j toward B_g[:, j] by V_j / V: a column only large volunteers train would be
diluted by everyone else. HetLoRA's zero padding is of that kind.) A clip scale s_i applies to
each trained column's delta as above. Weights are the reported examples, capped, as for every
update. `exact` and `fedavg` train A too, so a column of B means nothing without its row of A on
the same volunteer: they refuse ranks below r at admission. Rules: norm-based ones (free riders,
median clipping) compare norms scaled to the project's rank, norm x sqrt(r / r_i) (a per-component
RMS: a rank-4 update is not a free rider for having fewer columns), and the clip scale applies to
the update as sent, before f_i. Under `rank` and `mass` a volunteer at the same per-component RMS
as a full-rank one of the same w_i thus moves the adapter sqrt(r / r_i) times as far in Frobenius
norm (r / r_i the weight on r_i / r of the columns); under `rank` its share of any column stays at
most 1. Krum, the trimmed mean and central DP are not defined per column here and admission
refuses ranks below r under them (`coordinator.rules.nested_ranks_refusal`).

`exact` keeps, per module, the running sum Σ w_i B_i A_i as U diag(s) Vᵀ of rank <= K
(K = sketch rank, default 4r) plus pending factor columns, and never forms a d x k
matrix. When more than K columns are pending it absorbs them by an incremental SVD
(coordinator.lowrank); at most K singular values are kept. That is lossless while the sum's rank
stays within K; beyond it the dropped singular values are summed into the metric
`exact_truncation_bound` (by the triangle inequality an upper bound on the Frobenius
error of the mean before its final rank-r cut, relative to the mean's norm; the final
rank-r factors are then within best_rank_r_error + 2 x bound of the true mean).
Memory per module: (d + k) x 2K numbers, whatever N.

Clipping enters every mode as a scale s_i in [0, 1] on the update's delta:
contribution = global + s_i (update - global); in `exact`, B_g A_g + s_i (B_i A_i - B_g A_g).

Server step (`[aggregation] server_lr` = eta, FedOpt's server learning rate): the new global is
G + eta (M - G), M the mean above (after clipping, or the robust rule's combination); in `exact` on the
product, B'A' = rank-r SVD of B_g A_g + eta (mean B_i A_i - B_g A_g). eta = 1 skips it (bit for bit
the plain mean). Why: on non-IID data each volunteer's progress on its own skill reaches the mean
diluted by 1/N; eta > 1 gives some of it back at a cost in drift. dp refuses eta != 1 (config).

`RoundAggregator` runs one round's rules (coordinator.rules) on top (see its doc): streaming
when no rule needs the round's median, buffering the round's updates otherwise.

A little past ~400 lines: the three aggregators, their registry and the round's composition of
them are one subject (the maths above); the low-rank sum and the rules already live apart.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

from loracommons.coordinator import background, rules
from loracommons.coordinator.config import NESTED_WEIGHTINGS, AggregationSection, ConfigError, ProjectConfig
from loracommons.coordinator.lowrank import LowRank
from loracommons.coordinator.robust import HeldUpdates, module_pairs
from loracommons.coordinator.rules import Held, HeldView, Rejection, Tally
from loracommons.protocol import modes
from loracommons.protocol.lora import window_columns, window_start

if TYPE_CHECKING:
    from loracommons.coordinator.admission import Verdict

log = logging.getLogger(__name__)
NESTED_WEIGHTING = AggregationSection().nested_weighting  # the project default


class AggregationError(RuntimeError):
    """An aggregation asked of an impossible state (no updates, zero total weight)."""


class Aggregator(ABC):
    """Streaming aggregator: `add` folds one update; `result` returns the full new global adapter."""

    mode: ClassVar[str]
    """The registered mode it folds (set by `register_aggregator`)."""
    overlaps: ClassVar[bool] = True
    """Whether its fold may run on the helper thread while the next update is admitted. Not for
    folds that call BLAS (OpenBLAS's own threads then fight the caller's hashing for the cores)."""

    server_lr: float = 1.0
    """The server step on the mean delta (set by `make_aggregator`; see the module doc)."""

    def __init__(self, global_tensors: Mapping[str, np.ndarray]) -> None:
        self.global_tensors = dict(global_tensors)
        self.pairs = module_pairs(self.global_tensors)
        self.names = modes.get(self.mode).sent_names(self.global_tensors)
        self.count = 0
        self.total_weight = 0.0

    @classmethod
    def build(cls, global_tensors: Mapping[str, np.ndarray], sketch_rank: int | None = None,
              nested_weighting: str = NESTED_WEIGHTING) -> Aggregator:
        """The aggregator for one round; options a mode does not use are ignored."""
        return cls(global_tensors)

    def add(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float = 1.0,
            start: int = 0) -> None:
        """Fold one update; `scale` shrinks its delta toward the global (clipping). `start`: where the
        window of a smaller rank's columns begins (nested ranks, `protocol.lora.window_start`)."""
        if not (weight > 0 and math.isfinite(weight)) or not 0 <= scale <= 1:
            raise ValueError(f"weight must be positive and scale in [0, 1], got {weight}, {scale}")
        if start:
            self._fold_window(tensors, float(weight), float(scale), start)
        else:
            self._fold(tensors, float(weight), float(scale))
        self.count += 1
        self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise AggregationError("no update was added")
        return self._result()

    def metrics(self) -> dict[str, float]:
        return {}

    @abstractmethod
    def _fold(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float) -> None: ...

    def _fold_window(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float,
                     start: int) -> None:
        raise AggregationError(f"mode {self.mode!r} folds no window of columns (nested ranks are ffa's)")

    @abstractmethod
    def _result(self) -> dict[str, np.ndarray]: ...


_AGGREGATORS: dict[str, type[Aggregator]] = {}
_A = TypeVar("_A", bound=type[Aggregator])


def register_aggregator(mode: str) -> Callable[[_A], _A]:
    """Class decorator: the `Aggregator` that folds updates of the registered mode `mode`."""

    def register(cls: _A) -> _A:
        modes.get(mode)  # a mode the registry knows, or KeyError now rather than at the first round
        if _AGGREGATORS.get(mode, cls) is not cls:
            raise ValueError(f"mode {mode!r} already has an aggregator: {_AGGREGATORS[mode].__name__}")
        cls.mode = mode
        _AGGREGATORS[mode] = cls
        return cls

    return register


def unregister_aggregator(mode: str) -> None:
    """Remove a mode's aggregator (tests that add a toy mode clean up with this)."""
    _AGGREGATORS.pop(mode, None)


class MeanAggregator(Aggregator):
    """Weighted mean of each sent tensor.

    Keeps Σ w_i s_i X_i in float64 (exact for float32 inputs and integer weights) and the
    scalar Σ w_i s_i; the mean delta is then Σ w_i s_i X_i / W - (Σ w_i s_i / W) G. One
    widening multiply and one add per update, through a reused scratch buffer: no
    per-update allocation, no subtraction of the global until the end.
    """

    def __init__(self, global_tensors: Mapping[str, np.ndarray]) -> None:
        super().__init__(global_tensors)
        self._sum = {n: np.zeros(self.global_tensors[n].shape) for n in self.names}
        self._update_coef = 0.0  # Σ w_i s_i
        self._scratch = np.empty(max((s.size for s in self._sum.values()), default=0))

    def _fold(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        coef = weight * scale
        for name, acc in self._sum.items():
            tmp = self._scratch[: acc.size].reshape(acc.shape)
            np.multiply(tensors[name], coef, out=tmp, dtype=np.float64)
            acc += tmp
        self._update_coef += coef

    def mean_delta(self) -> dict[str, np.ndarray]:
        kept = self._update_coef / self.total_weight
        return {
            n: s / self.total_weight - kept * np.asarray(self.global_tensors[n], dtype=np.float64)
            for n, s in self._sum.items()
        }

    def _result(self) -> dict[str, np.ndarray]:
        out = {n: np.array(v, dtype=np.float32) for n, v in self.global_tensors.items()}
        for name, delta in self.mean_delta().items():
            if self.server_lr != 1.0:
                delta *= self.server_lr
            out[name] = (self.global_tensors[name] + delta).astype(np.float32)
        return out


@register_aggregator("ffa")
class FfaAggregator(MeanAggregator):
    """The mean of B per column, over the volunteers who trained each column (nested ranks: see the
    module doc). Per column j it keeps W_j = Σ w_i and C_j = Σ w_i s_i over S_j; the fold of a rank-r_i
    update touches the r_i columns of its window in each sum. With every update at rank r, W_j and C_j
    equal the scalars of `MeanAggregator` and the result is bit for bit its result."""

    def __init__(self, global_tensors: Mapping[str, np.ndarray], weighting: str = NESTED_WEIGHTING) -> None:
        super().__init__(global_tensors)
        if weighting not in NESTED_WEIGHTINGS:
            raise ConfigError(f"[aggregation] nested_weighting = {weighting!r}: one of {NESTED_WEIGHTINGS}")
        self.weighting = weighting
        self.rank = next((t.shape[0] for n, t in self.global_tensors.items() if ".lora_A." in n), 0)
        self._col_weight = np.zeros(self.rank)  # W_j
        self._col_coef = np.zeros(self.rank)  # C_j
        self.narrow = 0  # updates of a rank below r

    @classmethod
    def build(cls, global_tensors: Mapping[str, np.ndarray], sketch_rank: int | None = None,
              nested_weighting: str = NESTED_WEIGHTING) -> Aggregator:
        return cls(global_tensors, nested_weighting)

    def _column_factor(self, width: int) -> float:
        """The factor f_i on a rank-r_i update's column weights: 1, or r / r_i (see the module doc)."""
        return 1.0 if self.weighting == "trained" or width == self.rank else self.rank / width

    def _fold(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        self._fold_window(tensors, weight, scale, 0)

    def _fold_window(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float,
                     start: int) -> None:
        widths = {np.shape(tensors[n])[-1] for n in self.names}
        if len(widths) != 1 or not 1 <= (width := widths.pop()) <= self.rank:
            raise AggregationError(f"an update's B tensors must share one width in 1..{self.rank}")
        if not 0 <= start < max(self.rank, 1) or (start and width == self.rank):
            raise AggregationError(f"a window of {width} columns cannot start at {start} (rank {self.rank})")
        # the window's columns: a slice from 0 (bit for bit the plain path), an index array otherwise
        cols: slice | np.ndarray = slice(0, width) if start == 0 else window_columns(start, width, self.rank)
        factor = self._column_factor(width)
        coef = weight * scale * factor
        for name, acc in self._sum.items():
            shape = (*acc.shape[:-1], width)
            tmp = self._scratch[: math.prod(shape)].reshape(shape)
            np.multiply(tensors[name], coef, out=tmp, dtype=np.float64)
            acc[..., cols] += tmp
        self._col_weight[cols] += weight * factor
        self._col_coef[cols] += coef
        self._update_coef += coef
        self.narrow += width < self.rank

    def mean_delta(self) -> dict[str, np.ndarray]:
        trained = self._col_weight > 0
        weight = np.where(trained, self._col_weight, 1.0)
        if self.weighting == "mass":  # Σ over everyone: a column's weights need not sum to one
            weight = np.where(trained, self.total_weight, 1.0)
        kept = self._col_coef / weight
        out = {}
        for n, s in self._sum.items():
            delta = s / weight - kept * np.asarray(self.global_tensors[n], dtype=np.float64)
            delta[..., ~trained] = 0.0  # nobody trained these columns: they keep the global's value
            out[n] = delta
        return out

    def metrics(self) -> dict[str, float]:
        if not self.narrow:
            return {}
        return {"nested_rank_updates": float(self.narrow),
                "untrained_columns": float(np.sum(self._col_weight == 0))}


@register_aggregator("fedavg")
class FedAvgAggregator(MeanAggregator):
    pass


@register_aggregator("exact")
class ExactAggregator(Aggregator):
    """Rank-r SVD of the weighted mean of B_i A_i, folded from factors (see the module doc).

    Each module's running sum is U diag(s) Vᵀ of rank <= K plus up to K pending columns
    (w_i s_i B_i, A_i). Absorbing them is an incremental SVD (Brand 2006): the new
    columns are orthogonalized against U (and the new rows against V), and only a
    (j + b) x (j + b) core is decomposed: no d x k matrix, no QR wider than the pending block.
    """

    overlaps = False  # QR and SVD through BLAS

    def __init__(self, global_tensors: Mapping[str, np.ndarray], sketch_rank: int | None = None) -> None:
        super().__init__(global_tensors)
        a0 = self.global_tensors[next(iter(self.pairs.values()))[0]]
        self.r = a0.shape[0]
        self.keep = sketch_rank or 4 * self.r
        if self.keep < self.r:
            raise ConfigError(f"exact sketch rank {self.keep} is below the adapter rank {self.r}")
        self._sums = {
            m: LowRank(self.global_tensors[b].shape[0], self.global_tensors[a].shape[1])
            for m, (a, b) in self.pairs.items()
        }
        self._global_coef = 0.0  # Σ w_i (1 - s_i): clipped mass that stays at B_g A_g
        self.compressions = 0
        self._stats: dict[str, float] = {}
        self._out: dict[str, np.ndarray] | None = None

    @classmethod
    def build(cls, global_tensors: Mapping[str, np.ndarray], sketch_rank: int | None = None,
              nested_weighting: str = NESTED_WEIGHTING) -> Aggregator:
        return cls(global_tensors, sketch_rank)

    def _fold(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float) -> None:
        if self._out is not None:
            raise AggregationError("result() was already taken")
        for module, (a_name, b_name) in self.pairs.items():
            acc = self._sums[module]
            acc.push(tensors[b_name], tensors[a_name], weight * scale)
            if acc.pending > self.keep:
                acc.absorb(self.keep)
                self.compressions += 1
        self._global_coef += weight * (1.0 - scale)

    def _result(self) -> dict[str, np.ndarray]:
        if self._out is not None:  # the final absorption consumed the state: answer the same again
            return {n: v.copy() for n, v in self._out.items()}
        out: dict[str, np.ndarray] = {}
        total_sq = dropped_sq = residual_sq = 0.0
        # server step eta: (S + c G) / (W / eta) with c = c_0 + (1 - eta) W / eta is G + eta (M - G)
        w = self.total_weight / self.server_lr
        global_coef = self._global_coef + (w - self.total_weight)  # exactly c_0 at eta = 1
        for module, (a_name, b_name) in self.pairs.items():
            acc = self._sums[module]
            b0, a0 = (np.asarray(self.global_tensors[n], dtype=np.float64) for n in (b_name, a_name))
            if global_coef:
                acc.push(b0, a0, global_coef)
            dropped = acc.dropped  # the last absorption keeps every nonzero value: the cut to r is next
            spectrum = acc.absorb(keep=acc.pending + acc.s.size, spare=self.r) / w
            b, a = self._factors(acc, a0, w)
            out[b_name], out[a_name] = b.astype(np.float32), a.astype(np.float32)
            total_sq += float(np.sum(spectrum**2))
            residual_sq += float(np.sum(spectrum[self.r :] ** 2))
            dropped_sq += (dropped / w) ** 2
        norm = math.sqrt(total_sq) or 1.0
        self._stats = {
            "exact_truncation_bound": math.sqrt(dropped_sq) / norm,
            "exact_rank_r_residual": math.sqrt(residual_sq) / norm,
            "exact_compressions": float(self.compressions),
        }
        self._out = out
        return {n: v.copy() for n, v in out.items()}

    def _factors(self, acc: LowRank, a0: np.ndarray, w: float) -> tuple[np.ndarray, np.ndarray]:
        """Balanced rank-r factors of the sum over `w`; zero-energy directions keep a usable A row."""
        r = self.r
        rank = min(acc.s.size, r)
        root = np.sqrt(acc.s[:rank] / w)
        b = np.zeros((acc.u.shape[0], r))
        a = np.zeros((r, acc.v.shape[0]))
        b[:, :rank] = acc.u[:, :rank] * root
        a[:rank] = (acc.v[:, :rank] * root).T
        # B = 0 columns with A = 0 rows would never train again (each factor's gradient
        # goes through the other): give them unit directions scaled like the global A.
        spare = acc.spare[:, : r - rank].T if rank < r else np.zeros((0, a.shape[1]))
        a[rank : rank + spare.shape[0]] = spare * float(np.median(np.linalg.norm(a0, axis=1)))
        return b, a

    def metrics(self) -> dict[str, float]:
        return dict(self._stats)


def make_aggregator(
    mode: str, global_tensors: Mapping[str, np.ndarray], sketch_rank: int | None = None,
    nested_weighting: str = NESTED_WEIGHTING, server_lr: float = 1.0,
) -> Aggregator:
    """The registered aggregator of `mode`; ConfigError for a mode without one or a bad server step."""
    cls = _AGGREGATORS.get(mode)
    if cls is None:
        known = ", ".join(_AGGREGATORS)
        raise ConfigError(f"[aggregation] mode = {mode!r}: no aggregator registered (known: {known})")
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ConfigError(f"[aggregation] server_lr = {server_lr!r}: expected a finite number greater than 0")
    aggregator = cls.build(global_tensors, sketch_rank, nested_weighting)
    aggregator.server_lr = float(server_lr)
    return aggregator


@dataclass(frozen=True)
class RoundOutcome:
    tensors: dict[str, np.ndarray] | None  # the new global adapter; None = keep the previous version
    aggregated: tuple[str, ...]  # update digests folded in
    rejected: tuple[Rejection, ...]
    clip_scales: dict[str, float]  # digest -> scale applied (< 1 where clipped)
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # why tensors is None ("too_few")
    message: str = ""


class RoundAggregator:
    """One round: `offer` each accepted verdict as it arrives, then `finish` once.

    The configured rules (coordinator.rules) run on top of the mode's aggregator.
    Streaming (memory flat in N) when no rule needs the whole round: the plain modes,
    and dp (a fixed clip bound, applied as each update arrives). Median clipping,
    free-rider rejection, trimmed mean and Krum need every norm (or update) of the round
    first: those updates are held until `finish` (`buffers` is True), in memory, or with
    `spill_dir` in files on disk, read back one update (or one tensor) at a time. At
    `finish` the rules run in order on the held updates, the kept ones are folded (or
    combined by the rule that combines), and the rules finish the new tensors (dp noise).
    """

    def __init__(
        self,
        config: ProjectConfig,
        global_tensors: Mapping[str, np.ndarray],
        *,
        spill_dir: str | Path | None = None,
        rng: np.random.Generator | None = None,
        one_per_signer: bool = True,
    ) -> None:
        self.cfg = config
        self.one_per_signer = one_per_signer  # async: one per task instead (a fast signer sends several)
        self._offered = 0
        self.global_tensors = dict(global_tensors)
        agg = config.aggregation
        self.aggregator = make_aggregator(
            agg.mode, self.global_tensors, config.sketch_rank, agg.nested_weighting, agg.server_lr
        )
        self.rules = rules.configured(config)
        self.buffers = any(rule.buffers for rule in self.rules)
        self._uniform = any(rule.uniform_weights for rule in self.rules)
        self._held = HeldUpdates(spill_dir) if self.buffers else None
        self._pending: list[Held] = []
        self._scales: dict[str, float] = {}  # digest -> clip scale of each update aggregated
        self._weight = 0.0
        self._signers: set[str] = set()
        self._rng = rng if rng is not None else np.random.default_rng()
        self._project_rank = next((t.shape[0] for n, t in self.global_tensors.items() if ".lora_A." in n), 0)
        self._finished = False
        self._folding: Future[None] | None = None
        if self.aggregator.overlaps and self._held is None:
            background.helper()  # started before the first update arrives

    def weight(self, examples: int) -> float:
        """Examples reported, capped; 1 for every update under a rule that wants uniform weights (dp)."""
        return 1.0 if self._uniform else float(min(examples, self.cfg.aggregation.max_examples_weight))

    def offer(self, verdict: Verdict) -> None:
        """Take an accepted verdict; fold it now or hold it for `finish`. Drop the verdict afterwards."""
        if self._finished:
            raise RuntimeError("round already finished")
        if not verdict.accepted or verdict.tensors is None or verdict.manifest is None:
            raise ValueError(f"only accepted verdicts can be aggregated (got {verdict.reason!r})")
        signer, digest = verdict.signer or "", verdict.update_digest
        if self.one_per_signer and signer in self._signers:
            raise ValueError(f"signer {signer[:16]} already offered an update this round")
        self._signers.add(signer)
        self._offered += 1
        weight = self.weight(verdict.manifest.examples) * verdict.weight_factor
        norm = self._comparable_norm(verdict)
        start = window_start(verdict.manifest.round, verdict.manifest.rank or self._project_rank,
                             self._project_rank, signer)  # nested ranks: where the update's columns belong
        if self._held is not None:
            self._held.add(digest, verdict.tensors)
            self._pending.append(Held(digest, signer, weight, norm, start))
            return
        scale = self._fixed_scale(norm)
        self._fold_behind(verdict.tensors, weight, scale, start)
        self._record(digest, weight, scale)

    def _comparable_norm(self, verdict: Verdict) -> float:
        """The delta norm the rules compare: of a rank r_i < r update, scaled by sqrt(r / r_i) (its
        per-component RMS at the project's rank; see the module doc). Rules that use a fixed bound
        (dp) refuse smaller ranks at admission, so the scaling never meets a privacy bound."""
        norm = float(verdict.delta_norm or 0.0)
        assert verdict.manifest is not None  # an accepted verdict has one
        declared, full = verdict.manifest.rank, self._project_rank
        if declared is None or not 0 < declared < full:
            return norm
        return norm * math.sqrt(full / declared)

    def _fixed_scale(self, norm: float) -> float:
        """The clip scale of the rules with a fixed bound (dp), the same held or streamed."""
        return math.prod(rule.scale(norm) for rule in self.rules)

    def _fold_behind(self, tensors: Mapping[str, np.ndarray], weight: float, scale: float,
                     start: int = 0) -> None:
        """Fold on the helper thread (coordinator.background) while the caller admits the next
        update. One fold in flight at a time: the order of the sums is the order of
        the offers, and memory stays at one update."""
        self._wait_fold()
        thread = background.helper() if self.aggregator.overlaps else None
        if thread is None:
            self.aggregator.add(tensors, weight, scale, start)
            return
        self._folding = thread.submit(self.aggregator.add, tensors, weight, scale, start)

    def _wait_fold(self) -> None:
        folding, self._folding = self._folding, None
        if folding is not None:
            folding.result()

    def _record(self, digest: str, weight: float, scale: float) -> None:
        self._scales[digest] = scale
        self._weight += weight

    def finish(self) -> RoundOutcome:
        """Apply the round's rules and return the new global adapter (or why there is none)."""
        if self._finished:
            raise RuntimeError("round already finished")
        self._finished = True
        self._wait_fold()
        metrics: dict[str, float] = {"admitted": float(self._offered)}
        tally = Tally((), ())
        if self._held is not None:
            try:
                tally = self._apply_rules(self._held, metrics)
                metrics.update(tally.metrics)
            finally:
                self._held.close()
        need = self.cfg.round.min_volunteers
        if len(self._scales) < need:
            message = (
                f"{len(self._scales)} of {self._offered} admitted updates usable, {need} required"
                f"{tally.why_none}: keeping the previous version"
            )
            log.info("round not aggregated: %s", message)
            return RoundOutcome(None, (), tally.rejected, {}, metrics, "too_few", message)
        tensors = self.aggregator.result() if tally.delta is None else self._apply_delta(tally.delta)
        metrics.update(
            aggregated=float(len(self._scales)),
            total_weight=self._weight,
            clipped=float(sum(s < 1 for s in self._scales.values())),
            **self.aggregator.metrics(),
        )
        for rule in self.rules:
            metrics.update(rule.finish(tensors, self.aggregator.names, len(self._scales), self._rng))
        return RoundOutcome(tensors, tuple(self._scales), tally.rejected, dict(self._scales), metrics)

    def _apply_rules(self, held: HeldUpdates, metrics: dict[str, float]) -> Tally:
        """Run the rules on the held updates, then fold the kept ones (unless a rule combined them)."""
        if not self._pending:
            return Tally((), ())
        metrics["median_norm"] = float(np.median([h.norm for h in self._pending]))
        need = self.cfg.round.min_volunteers
        view = HeldView(held, self.aggregator.names, self.global_tensors)
        # a fixed clip bound (dp's clip_norm) applies to held updates exactly as to streamed ones
        fixed = tuple(self._fixed_scale(h.norm) for h in self._pending)
        tally = Tally(tuple(self._pending), fixed)
        for rule in self.rules:
            if rule.needs_quorum and len(tally.kept) < need:
                continue  # nothing will be aggregated: the rule has nothing to act on
            tally = rule.apply(tally, view)
        if len(tally.kept) >= need:
            for h, scale in zip(tally.kept, tally.scales, strict=True):
                if tally.delta is None:
                    self.aggregator.add(held.tensors(h.digest), h.weight, scale, h.start)
                self._record(h.digest, h.weight, scale)
        return tally

    def _apply_delta(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The robust rule's combined delta, times the server step."""
        out = {n: np.array(v, dtype=np.float32) for n, v in self.global_tensors.items()}
        eta = self.aggregator.server_lr
        for name, value in delta.items():
            step = value if eta == 1.0 else eta * np.asarray(value, dtype=np.float64)
            out[name] = (self.global_tensors[name] + step).astype(np.float32)
        return out
