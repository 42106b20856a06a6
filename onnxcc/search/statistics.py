"""Layer-input statistics over calibration rows: what refits, rank fits and channel scores read.

Per layer, E[p²] of every input column and, where a refit may use them, the second moments
E[zzᵀ] of the rows ``z = [p; 1]`` and E[tzᵀ] towards the original network's rows ``t`` at the
same layer. The sums stream: each statistics run adds its rows in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import blas

ROWS_PER_UNKNOWN = 4
MIN_REFIT_FRACTION = 0.05   # the smallest kept fraction a refit is planned for


@dataclass
class Stats:
    energy: dict[str, np.ndarray] = field(default_factory=dict)    # layer key -> E[p²] per column
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (E[zzᵀ], E[tzᵀ])
    rows: dict[str, int] = field(default_factory=dict)             # layer key -> regression rows seen

    def moments_for(self, key: str, kept_columns: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Moments only where the rows clearly outnumber the unknowns: a classifier after global
        pooling sees one row per image, and a refit on 12 rows fits any 12 outputs exactly."""
        if self.rows.get(key, 0) < ROWS_PER_UNKNOWN * (kept_columns + 1):
            return None
        return self.moments.get(key)


class MomentSums:
    """Sums of squares and second-moment products over streamed rows, per layer.

    The products of z = [row; 1] (and of the original's rows t) accumulate in float32, in place,
    by BLAS: a big model's rows stream one sample at a time, and a product, a float64 copy and a
    sum per sample and layer cost more than the products did. Σ zzᵀ is symmetric: its upper
    triangle is summed (half the work) and mirrored once at the end. float32 sums of float32
    products err far below the refits' ridge, and the solves run in float64 (they copy the
    block they use)."""

    def __init__(self) -> None:
        self.energy: dict[str, np.ndarray] = {}
        self.products: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}   # key -> (Σ zzᵀ, Σ tzᵀ or None: t = z)
        self.rows: dict[str, int] = {}

    def add(self, key: str, r: np.ndarray, target: np.ndarray | None, moments: bool) -> None:
        sq = np.square(r).sum(0, dtype=np.float64)
        self.energy[key] = self.energy.get(key, 0.0) + sq
        self.rows[key] = self.rows.get(key, 0) + len(r)
        if moments:
            z = _with_ones(r)
            n = z.shape[1]
            S, C = self.products.get(key) or (np.zeros((n, n), np.float32, order="F"),
                                              None if target is None else np.zeros((n, n), np.float32, order="F"))
            # zᵀ is a Fortran-ordered view of z and the sums are Fortran-ordered: nothing is copied
            S = blas.ssyrk(1.0, z.T, beta=1.0, c=S, overwrite_c=1)
            if target is not None:
                C = blas.sgemm(1.0, _with_ones(target).T, z.T, beta=1.0, c=C, trans_b=1, overwrite_c=1)
            self.products[key] = (S, C)

    def stats(self) -> "Stats":
        """The means; moments only for layers whose rows clearly outnumber their unknowns (a refit
        needs ROWS_PER_UNKNOWN rows per kept column)."""
        stats = Stats()
        for key, total in self.rows.items():
            stats.rows[key] = total
            stats.energy[key] = self.energy[key] / max(total, 1)
            if key in self.products:
                S, C = self.products[key]
                if total >= ROWS_PER_UNKNOWN * (MIN_REFIT_FRACTION * (len(S) - 1) + 1):
                    S += np.triu(S, 1).T   # the lower triangle was never written: zeros
                    S /= total   # in place: the sums are not used again
                    if C is not None:
                        C /= total
                    stats.moments[key] = (S, S if C is None else C)
        return stats


def _with_ones(r: np.ndarray) -> np.ndarray:
    """[r, 1] row by row, float32 and C-ordered."""
    return np.concatenate([r, np.ones((len(r), 1), np.float32)], 1, dtype=np.float32)
