"""Channel importance: the order in which each group's channels go (Optimal Brain Surgeon on
column blocks, refit-aware; a diagonal score where moments are missing or too wide)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..analysis.groups import Analysis
from .plan import Plan
from .probe import WeightProbe
from .refit import ridge
from .statistics import Stats


OBS_MAX_COLUMNS = 1536   # wider readers fall back to the diagonal score (the inverse is cubic)


@dataclass
class _Reader:
    """One layer that reduces over a group's channels: its current weight (Cout × D), the inverse
    of its kept input columns' second moments (None: diagonal fallback) and, per channel of the
    group, the indices of its columns (in the kept-columns numbering when ``Sinv`` is known)."""

    W: np.ndarray
    Sinv: np.ndarray | None
    energy: np.ndarray | None
    columns: dict[int, np.ndarray]


def channel_scores(probe: WeightProbe, plan: Plan, weights: dict[str, np.ndarray],
                   stats: Stats, batch: int = 16) -> dict[int, np.ndarray]:
    """Per group, per channel: the order in which channels go (lowest first; inf once removed).

    Channels are removed greedily by the output error their removal costs *after* the reading
    layers refit the rest — Optimal Brain Surgeon on column blocks: removing the columns B of a
    layer with weight W and input moments S costs ``tr(W_B (S⁻¹_BB)⁻¹ W_Bᵀ)``, and W and S⁻¹
    are updated so the next choice sees the refit. A channel that others can stand in for goes
    early even when its weights are large. Readers without moments (too few calibration rows)
    or too wide for the inverse use the diagonal form ``‖W[:, c]‖²·E[x_c²]``. ``batch`` channels
    go per update."""
    a = probe.analysis
    readers: dict[int, list[_Reader]] = {gid: [] for gid, g in a.groups.items() if g.prunable}
    for key, v in probe.views.items():
        layer = v.layer
        if layer.red_layout is None or layer.op == "ConvTranspose":
            continue
        W = v.matrix(weights.get(v.weight, probe.original[v.weight]))
        in_m = a.mask(v.node.inputs[0].name, plan.keep)
        cols = np.ones(W.shape[1], bool) if in_m is None else np.repeat(in_m, v.taps)
        moments = stats.moments_for(key, int(cols.sum()))
        Sinv = None
        if moments is not None and cols.sum() <= OBS_MAX_COLUMNS:
            kp = np.append(cols, True)    # the bias column always stays
            Sinv = np.linalg.inv(ridge(moments[0][np.ix_(kp, kp)]))
        renum = np.cumsum(cols) - 1       # column -> index among kept columns
        gids, chans = index_map(a, layer.red_layout)
        for gid in np.unique(gids):
            if gid not in readers:
                continue
            columns = {}
            for c in np.unique(chans[gids == gid]):
                pos = np.flatnonzero((gids == gid) & (chans == c))
                idx = (pos[:, None] * v.taps + np.arange(v.taps)).ravel()
                idx = idx[cols[idx]]
                if len(idx):
                    columns[int(c)] = renum[idx] if Sinv is not None else idx
            if columns:
                readers[gid].append(_Reader(W[:, cols].copy() if Sinv is not None else W,
                                            Sinv, stats.energy.get(key), columns))
    scores = {}
    for gid, rs in readers.items():
        live = plan.keep.get(gid, np.ones(a.groups[gid].size, bool))
        scores[gid] = _greedy_order(rs, live, batch)
    return scores


def _greedy_order(readers: list[_Reader], live: np.ndarray, batch: int) -> np.ndarray:
    order = np.full(len(live), np.inf)
    alive = [int(c) for c in np.flatnonzero(live)]
    static = np.zeros(len(live))
    for r in readers:
        if r.Sinv is None:
            for c, idx in r.columns.items():
                e = r.energy[idx] if r.energy is not None and len(r.energy) == r.W.shape[1] else 1.0
                static[c] += float(((r.W[:, idx] ** 2).sum(0) * e).sum())
    rank = 0
    while alive:
        cost = static[alive].copy()
        for r in (r for r in readers if r.Sinv is not None):
            for i, c in enumerate(alive):
                idx = r.columns.get(c)
                if idx is not None:
                    cost[i] += _obs_cost(r, idx)
        take = [alive[i] for i in np.argsort(cost, kind="stable")[:batch]]
        for c in take:
            order[c] = rank
            rank += 1
        gone = set(take)
        alive = [c for c in alive if c not in gone]
        if alive:
            for r in (r for r in readers if r.Sinv is not None):
                idx = [r.columns[c] for c in take if c in r.columns]
                if idx:
                    _obs_remove(r, np.concatenate(idx))
    return order


def _obs_cost(r: _Reader, idx: np.ndarray) -> float:
    """Output error of removing columns ``idx`` with the other columns refit optimally."""
    Wb = r.W[:, idx]
    if len(idx) == 1:
        return float((Wb ** 2).sum() / max(r.Sinv[idx[0], idx[0]], 1e-30))
    return float(np.sum(Wb * np.linalg.solve(r.Sinv[np.ix_(idx, idx)], Wb.T).T))


def _obs_remove(r: _Reader, idx: np.ndarray) -> None:
    """Remove columns ``idx``: refit the rest (W -= W_B M S⁻¹_B:) and condition S⁻¹ on it."""
    M = np.linalg.inv(r.Sinv[np.ix_(idx, idx)])
    rows = r.Sinv[idx]                                  # |B| × (D+1)
    r.W -= (r.W[:, idx] @ M) @ rows[:, :-1]
    r.Sinv -= rows.T @ M @ rows
    r.W[:, idx] = 0.0


def index_map(a: Analysis, layout) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a layout's expanded axis: (group id, channel index in that group)."""
    gids, chans = [], []
    for atom in a.atoms.expand(layout.atoms):
        size = a.atoms.size[atom]
        gids.append(np.full(size, a.atoms.find(atom)))
        chans.append(np.arange(size))
    g = np.tile(np.repeat(np.concatenate(gids), layout.inner), layout.outer)
    c = np.tile(np.repeat(np.concatenate(chans), layout.inner), layout.outer)
    return g, c
