"""Layer-input statistics over calibration rows: what refits, rank fits and channel scores read.

Per layer, E[p²] of every input column and, where a refit may use them, the second moments
E[zzᵀ] of the rows ``z = [p; 1]`` and E[tzᵀ] towards the original network's rows ``t`` at the
same layer. The sums stream: each statistics run adds its rows in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .refit import moment_sums

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
    """Sums of squares and second-moment products over streamed rows, per layer."""

    def __init__(self) -> None:
        self.energy: dict[str, np.ndarray] = {}
        self.products: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}   # key -> (Σ zzᵀ, Σ tzᵀ or None: t = z)
        self.rows: dict[str, int] = {}

    def add(self, key: str, r: np.ndarray, target: np.ndarray | None, moments: bool) -> None:
        sq = np.square(r).sum(0, dtype=np.float64)
        self.energy[key] = self.energy.get(key, 0.0) + sq
        self.rows[key] = self.rows.get(key, 0) + len(r)
        if moments:
            S, C = moment_sums(r, target)
            if key in self.products:   # in place: a wide layer's sums are hundreds of MB
                S0, C0 = self.products[key]
                S0 += S
                if C0 is not None:
                    C0 += C
            else:
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
                    S /= total   # in place: the sums are not used again
                    if C is not None:
                        C /= total
                    stats.moments[key] = (S, S if C is None else C)
        return stats
