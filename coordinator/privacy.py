"""Central differential privacy: Gaussian noise on the round's mean delta, and its accountant.

Each round (dp = true) clips every update's delta to L2 norm C (`clip_norm`), takes
the unweighted mean over the n aggregated updates and adds N(0, (z C / n)^2) to every
coordinate the mode trains (z = `noise_multiplier`): the sum of deltas carries noise
z C. Who took part in a round is public (releases list contributors), so neighbouring
rounds differ by *replacing* one volunteer's update, and the sum's L2 sensitivity is
2C: each round is a Gaussian mechanism with effective noise multiplier z / 2
(`relation="add_remove"` gives z, the relation most DP-FedAvg papers use).
No amplification by sampling is claimed: volunteers are whoever is online, not a
random sample.

Accounting is Rényi DP (Mironov 2017): a Gaussian mechanism with multiplier s has
RDP α / (2 s²) at every order α; T rounds compose to T α / (2 s²); the conversion to
(ε, δ) is the one of Balle et al. 2020 (Thm 21), as in Opacus:
ε = RDP(α) + log((α-1)/α) - (log δ + log α) / (α - 1), minimised over the orders.
(Flower 1.42's `flwr.serverapp.RdpAccountant` wraps Google's `dp-accounting`, which is
not installed here; this module imports no flwr.) The sampling of the noise uses
numpy's PCG64 seeded from the OS; floating-point attacks on the Gaussian
(Mironov 2012) are not mitigated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10 for x in range(1, 10)),
    *(2 + x / 4 for x in range(0, 32)),
    *range(10, 64),
    *(64 + 8 * x for x in range(0, 24)),
    256,
    384,
    512,
    768,
    1024,
    2048,
    4096,
)
RELATIONS = ("replace_one", "add_remove")


def effective_multiplier(noise_multiplier: float, relation: str = "replace_one") -> float:
    """Noise std over L2 sensitivity of the round's sum of clipped deltas."""
    if relation not in RELATIONS:
        raise ValueError(f"relation {relation!r}: expected one of {', '.join(RELATIONS)}")
    return noise_multiplier / 2 if relation == "replace_one" else noise_multiplier


def gaussian_rdp(multiplier: float, rounds: int, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of `rounds` Gaussian mechanisms of noise multiplier `multiplier`, at each order."""
    if not multiplier > 0:
        raise ValueError(f"noise multiplier must be positive, got {multiplier}")
    return rounds * np.asarray(orders, dtype=np.float64) / (2 * multiplier**2)


def rdp_to_epsilon(
    rdp: np.ndarray, orders: Sequence[float], delta: float, conversion: str = "balle2020"
) -> tuple[float, float]:
    """(ε, best order) at `delta`. `conversion="classic"` is Mironov's ε = RDP + log(1/δ)/(α-1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    if conversion == "classic":
        eps = rdp + math.log(1 / delta) / (a - 1)
    elif conversion == "balle2020":
        eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    else:
        raise ValueError(f"unknown conversion {conversion!r}")
    i = int(np.argmin(eps))
    return max(float(eps[i]), 0.0), float(a[i])


def epsilon(
    rounds: int,
    noise_multiplier: float,
    delta: float,
    relation: str = "replace_one",
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> float:
    """ε after `rounds` dp rounds; 0 before any. Pure: resume by counting the dp rounds done."""
    if rounds <= 0:
        return 0.0
    multiplier = effective_multiplier(noise_multiplier, relation)
    return rdp_to_epsilon(gaussian_rdp(multiplier, rounds, orders), orders, delta)[0]


class RdpAccountant:
    """Running ε of a project's dp rounds. State is one integer: `rounds`."""

    def __init__(
        self,
        noise_multiplier: float,
        delta: float,
        max_epsilon: float = 0.0,
        rounds: int = 0,
        relation: str = "replace_one",
    ) -> None:
        effective_multiplier(noise_multiplier, relation)
        self.noise_multiplier, self.delta, self.max_epsilon = noise_multiplier, delta, max_epsilon
        self.relation = relation
        self.rounds = rounds

    def epsilon(self, rounds: int | None = None) -> float:
        n = self.rounds if rounds is None else rounds
        return epsilon(n, self.noise_multiplier, self.delta, self.relation)

    def would_exceed(self, more: int = 1) -> bool:
        """Whether `more` rounds would pass `max_epsilon` (never, when it is 0 = no limit)."""
        return bool(self.max_epsilon) and self.epsilon(self.rounds + more) > self.max_epsilon

    def compose(self, rounds: int = 1) -> float:
        """Count `rounds` more dp rounds; returns the new ε."""
        self.rounds += rounds
        return self.epsilon()


def add_gaussian_noise(
    tensors: Mapping[str, np.ndarray], names: Iterable[str], std: float, rng: np.random.Generator
) -> None:
    """Add N(0, std^2) in place to each named tensor (fresh float arrays from an aggregator)."""
    for name in names:
        arr = tensors[name]
        arr += rng.normal(0.0, std, size=arr.shape).astype(arr.dtype)


def gaussian_delta_exact(eps: float, mu: float) -> float:
    """δ(ε) of a Gaussian mechanism with sensitivity/noise ratio `mu` (Balle & Wang 2018).

    T-fold composition is exactly a Gaussian with mu √T; tests use this as ground truth.
    """

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)
