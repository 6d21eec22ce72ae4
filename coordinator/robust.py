"""Update geometry and robust rules: delta norms, median clipping, trimmed mean, Multi-Krum.

An update's *delta* is taken against the global adapter it started from, in the
geometry its mode names (`Mode.norm`, protocol/modes.py):

    parameter   the flattened tensors it sends, minus the global's   (ffa, fedavg)
    product     B_i A_i - B_g A_g, summed over modules              (exact; Frobenius, alpha/r excluded)

The product norm comes from r x r Gram matrices of the factors, never from a
d x k product. Multi-Krum and the trimmed mean work on flattened parameter
deltas in every mode (in `exact`, the A and B deltas side by side; every
volunteer starts from the same global factors, so they are comparable).

Both need every update of the round: `HeldUpdates` keeps them, in memory (N x one
payload) or spilled to safetensors files read back one tensor at a time (N x one
tensor in memory; N x one payload on disk). Krum is O(N^2 x size) time.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open

from loracommons.protocol import modes
from loracommons.protocol.codec import encode_tensors
from loracommons.protocol.modes import Mode

_A, _B = ".lora_A.", ".lora_B."


def module_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A name, B name); every A must have its B and vice versa."""
    a_names, b_names = {}, {}
    for name in names:
        if _A in name:
            a_names[name.replace(_A, "\0", 1)] = name
        elif _B in name:
            b_names[name.replace(_B, "\0", 1)] = name
        else:
            raise ValueError(f"tensor {name!r} is neither a lora_A nor a lora_B factor")
    if set(a_names) != set(b_names):
        odd = sorted(set(a_names) ^ set(b_names))[0]
        raise ValueError(f"LoRA factor without its pair: {odd.replace(chr(0), '.lora_?.')!r}")
    return {key.split("\0")[0]: (a_names[key], b_names[key]) for key in sorted(a_names)}


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def product_delta_sq(b: np.ndarray, a: np.ndarray, b0: np.ndarray, a0: np.ndarray) -> float:
    """||B A - B0 A0||_F^2 from the factors: tr((X^T X)(Y Y^T)) with X = [B, -B0], Y = [A; A0]."""
    x = np.concatenate([_f64(b), -_f64(b0)], axis=1)
    y = np.concatenate([_f64(a), _f64(a0)], axis=0)
    return max(float(np.sum((x.T @ x) * (y @ y.T))), 0.0)


def delta_norm(
    tensors: Mapping[str, np.ndarray], global_tensors: Mapping[str, np.ndarray], mode: str | Mode
) -> float:
    """L2 norm of an update's delta against the global adapter (see the module doc).

    NaN exactly when some value of the update is NaN or infinite: the fast float32 sum can
    overflow only for a delta above ~1e19, and then the sum is redone in float64, where squares
    of float32 values cannot overflow. Admission relies on this as its finiteness check.
    """
    geometry = (modes.get(mode) if isinstance(mode, str) else mode).norm
    if geometry == "product":  # float64 throughout: finite for finite float32 factors
        total = 0.0
        for a_name, b_name in module_pairs(global_tensors).values():
            total += product_delta_sq(
                tensors[b_name], tensors[a_name], global_tensors[b_name], global_tensors[a_name]
            )
        return math.sqrt(total) if math.isfinite(total) else math.nan
    total = 0.0
    for name, value in tensors.items():
        # In float32 (the payload's precision); numpy's pairwise sum keeps the relative error
        # near log2(n) ulp, and no BLAS thread pool starts for a dot product.
        diff = np.subtract(value, global_tensors[name], dtype=np.float32).ravel()
        total += float(np.add.reduce(np.square(diff, out=diff), dtype=np.float32))
    if math.isfinite(total):
        return math.sqrt(total)
    total = 0.0
    for name, value in tensors.items():
        diff = (_f64(value) - global_tensors[name]).ravel()
        total += float(diff @ diff)
    return math.sqrt(total) if math.isfinite(total) else math.nan


def clip_scale(norm: float, bound: float) -> float:
    """Factor that brings a delta of `norm` within `bound` (1.0 when already inside)."""
    return 1.0 if norm <= bound else bound / norm


class HeldUpdates:
    """Admitted update tensors kept until the round ends; in memory, or spilled to disk."""

    def __init__(self, spill_dir: str | Path | None = None) -> None:
        self._mem: dict[str, Mapping[str, np.ndarray]] = {}
        self._tmp = tempfile.TemporaryDirectory(dir=spill_dir, prefix="round-") if spill_dir else None
        self._files: dict[str, Path] = {}

    def add(self, key: str, tensors: Mapping[str, np.ndarray]) -> None:
        if self._tmp is None:
            self._mem[key] = tensors
            return
        path = Path(self._tmp.name) / f"{len(self._files):06d}.safetensors"
        path.write_bytes(encode_tensors({k: np.asarray(v) for k, v in tensors.items()}))
        self._files[key] = path

    def tensor(self, key: str, name: str) -> np.ndarray:
        if self._tmp is None:
            return self._mem[key][name]
        with safe_open(str(self._files[key]), framework="numpy") as fh:
            return fh.get_tensor(name)

    def tensors(self, key: str) -> Mapping[str, np.ndarray]:
        if self._tmp is None:
            return self._mem[key]
        with safe_open(str(self._files[key]), framework="numpy") as fh:
            return {name: fh.get_tensor(name) for name in fh.keys()}

    def close(self) -> None:
        self._mem.clear()
        if self._tmp is not None:
            self._tmp.cleanup()


def _stacked_deltas(
    held: HeldUpdates, keys: list[str], name: str, global_value: np.ndarray, scales: list[float]
) -> np.ndarray:
    """N x size matrix of one tensor's (scaled) deltas, float64."""
    g = _f64(global_value).ravel()
    out = np.empty((len(keys), g.size))
    for row, (key, scale) in enumerate(zip(keys, scales, strict=True)):
        out[row] = (_f64(held.tensor(key, name)).ravel() - g) * scale
    return out


def krum_scores(
    held: HeldUpdates, keys: list[str], names: list[str], global_tensors: Mapping[str, np.ndarray], f: int
) -> np.ndarray:
    """Krum score per update: sum of squared distances to its n - f - 2 nearest neighbours.

    The Gram matrix of the flattened deltas is accumulated one tensor at a time.
    """
    n = len(keys)
    if n <= 2 * f + 2:
        raise ValueError(f"Krum needs more than 2f+2 = {2 * f + 2} updates, got {n}")
    gram = np.zeros((n, n))
    ones = [1.0] * n
    for name in names:
        block = _stacked_deltas(held, keys, name, global_tensors[name], ones)
        gram += block @ block.T
    sq = np.diag(gram)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, : n - f - 2]
    return nearest.sum(axis=1)


def multi_krum(
    held: HeldUpdates, keys: list[str], names: list[str], global_tensors: Mapping[str, np.ndarray], f: int
) -> list[str]:
    """Multi-Krum (Blanchard et al. 2017): keep the n - f updates with the lowest Krum scores."""
    scores = krum_scores(held, keys, names, global_tensors, f)
    order = np.argsort(scores, kind="stable")
    return [keys[i] for i in sorted(order[: len(keys) - f])]


def trimmed_mean_deltas(
    held: HeldUpdates,
    keys: list[str],
    names: list[str],
    global_tensors: Mapping[str, np.ndarray],
    trim: int,
    scales: list[float],
) -> dict[str, np.ndarray]:
    """Coordinate-wise mean of the deltas after dropping the `trim` lowest and highest values.

    Unweighted, like Flower's FedTrimmedAvg: a reported example count cannot buy a
    way past the trimming.
    """
    n = len(keys)
    if trim < 1 or 2 * trim >= n:
        raise ValueError(f"trimming {trim} per side of {n} updates is not a trimmed mean")
    out = {}
    for name in names:
        block = _stacked_deltas(held, keys, name, global_tensors[name], scales)
        block.sort(axis=0)
        out[name] = block[trim : n - trim].mean(axis=0).reshape(global_tensors[name].shape)
    return out
