"""A d x k matrix sum kept in low-rank form and updated by an incremental SVD (Brand 2006).

`exact` aggregation keeps each module's running sum of B_i A_i here: new B columns are
orthogonalized against U (the new A rows against V), QR'd, and only a small
(j + b) x (j + b) core goes through an SVD; singular values below 1e-12 of the largest are
dropped. No d x k matrix is ever formed.
"""

from __future__ import annotations

import math

import numpy as np

ZERO_RTOL = 1e-12


class LowRank:
    """A d x k sum kept as U diag(s) Vᵀ (U, V orthonormal) plus pending blocks P Q not yet folded in."""

    def __init__(self, d: int, k: int) -> None:
        self.u, self.s, self.v = np.zeros((d, 0)), np.zeros(0), np.zeros((k, 0))
        self.p: list[tuple[np.ndarray, float]] = []  # (B block as sent, its coefficient w_i s_i)
        self.q: list[np.ndarray] = []
        self.pending = 0
        self.dropped = 0.0  # Σ over absorptions of the Frobenius norm of what was dropped
        self.spare = np.zeros((k, 0))  # unit row directions of zero energy, for padding

    def push(self, p: np.ndarray, q: np.ndarray, coef: float) -> None:
        """Queue coef * p @ q; the blocks are copied (float32 when sent so), releasing the payload."""
        dtype = np.float64 if p.dtype == np.float64 else np.float32
        self.p.append((np.array(p, dtype=dtype), coef))
        self.q.append(np.array(q, dtype=dtype))
        self.pending += p.shape[1]

    def absorb(self, keep: int, spare: int = 0) -> np.ndarray:
        """Fold the pending blocks in, keeping at most `keep` singular values; returns the full spectrum.

        `spare`: also keep that many unit directions of the row space beyond the kept ones.
        """
        if not self.pending:
            return self.s
        p = np.hstack([block.astype(np.float64) * coef for block, coef in self.p])
        q = np.vstack(self.q).astype(np.float64)
        self.p, self.q = [], []
        j, b = self.s.size, p.shape[1]
        if j + b > min(self.u.shape[0], self.v.shape[0]):
            # [U, P] cannot have j + b orthonormal columns: factor the stack directly.
            left, core, right = _direct_core(np.hstack([self.u * self.s, p]), np.vstack([self.v.T, q]))
        else:
            c, qa, ra = _orthogonalize(self.u, p)
            dq, qb, rb = _orthogonalize(self.v, q.T)
            lower = np.block([[np.eye(j), c], [np.zeros((b, j)), ra]])
            upper = np.block([[np.eye(j), dq], [np.zeros((b, j)), rb]])
            core = (lower * np.concatenate([self.s, np.ones(b)])) @ upper.T
            left, right = np.hstack([self.u, qa]), np.hstack([self.v, qb])
        uc, sc, vct = np.linalg.svd(core, full_matrices=False)
        rank = int(np.sum(sc > ZERO_RTOL * sc[0])) if sc.size and sc[0] > 0 else 0
        kept = min(rank, keep)
        self.dropped += math.sqrt(float(np.sum(sc[kept:] ** 2)))
        self.u, self.s, self.v = left @ uc[:, :kept], sc[:kept], right @ vct[:kept].T
        self.spare = right @ vct[kept : kept + spare].T
        self.pending = 0
        return sc


def _orthogonalize(basis: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """block = basis @ c + qa @ ra, qa orthonormal and orthogonal to basis (Gram-Schmidt twice, then QR)."""
    c = basis.T @ block
    rest = block - basis @ c
    c2 = basis.T @ rest
    rest -= basis @ c2
    qa, ra = np.linalg.qr(rest)
    return c + c2, qa, ra


def _direct_core(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P Q = left @ core @ rightᵀ with orthonormal left and right (QR of each factor)."""
    qp, rp = np.linalg.qr(p)
    qq, rq = np.linalg.qr(q.T)
    return qp, rp @ rq.T, qq
