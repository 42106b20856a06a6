"""The plan emulated inside the unmodified graph: the weights a probe feeds for it.

Pruning zeroes the reads of removed channels, numerically what the physical rewrite gives (see
the exactness tests), and refits the kept ones by least squares where layer statistics allow; a
rank feeds the activation-aware rank-r weight. :func:`emulate` takes the statistics under the
weights so far (one pass of the samples per step, for the step's base and its plan) and keeps
refits only where they measure better than plain removal.
"""
from __future__ import annotations

import logging

import numpy as np

from .plan import Plan
from .probe import WeightProbe
from .refit import refit, whitener
from .statistics import Stats

log = logging.getLogger(__name__)


def plan_weights(probe: WeightProbe, plan: Plan, stats: Stats | None = None,
                 only: set[str] | None = None) -> dict[str, np.ndarray]:
    """Weights (and biases) that emulate ``plan`` inside the unmodified graph.

    Removed channels: reads zeroed (kept ones refit by least squares where ``stats`` has the
    layer's second moments). Ranks: activation-aware rank-r fit of the (refit) kept columns.
    With ``only`` (layer keys) just those layers are computed, and always returned, so they can
    overwrite a base plan's weights when a candidate changes a single unit.
    """
    a, stats = probe.analysis, stats or Stats()
    out: dict[str, np.ndarray] = {}
    for key, v in probe.views.items():
        if only is not None and key not in only:
            continue
        W = probe.original[v.weight]
        b = probe.original[v.bias] if v.bias else None
        layer = v.layer
        in_m = a.mask(v.node.inputs[0].name, plan.keep) if layer.red_layout is not None else None
        out_m = a.mask(key, plan.keep) if layer.group == 1 else None
        in_m = None if in_m is None or in_m.all() else in_m
        out_m = None if out_m is None or out_m.all() else out_m
        rank = plan.ranks.get(key)
        if in_m is None and out_m is None and rank is None:
            if only is not None:
                out[v.weight] = W
                if v.bias:
                    out[v.bias] = b
            continue
        if layer.op == "ConvTranspose":
            W = W.copy()
            if in_m is not None:
                W[~in_m] = 0
            out[v.weight] = W
            continue
        Wm = v.matrix(W)
        cols = np.ones(Wm.shape[1], bool) if in_m is None else np.repeat(in_m, v.taps)
        # a shared weight is one tensor for every reader: a refit to one reader's inputs would
        # be wrong for the others
        moments = None if layer.shared else stats.moments_for(key, int(cols.sum()))
        S = moments[0] if moments is not None else None
        if in_m is not None and moments is not None:
            Wm, b = refit(Wm, b.astype(np.float64) if b is not None else None, *moments, cols)
        else:
            Wm[:, ~cols] = 0
        if out_m is not None:
            Wm[~out_m] = 0
        if rank is not None and cols.any() and (out_m is None or out_m.any()):   # else the layer folds away
            Wm = _low_rank(probe, key, Wm, cols, rank, S, stats.energy.get(key), in_m, out_m)
        out[v.weight] = v.native(Wm, W)
        if v.bias:
            out[v.bias] = np.asarray(b, probe.original[v.bias].dtype)
    return out


def _low_rank(probe: WeightProbe, key: str, Wm: np.ndarray, cols: np.ndarray, rank: int,
              S: np.ndarray | None, energy: np.ndarray | None, in_m, out_m) -> np.ndarray:
    """Activation-aware rank-r fit: full whitening where moments are known, else diagonal.

    The SVD depends on the layer and its pruning masks, not on the rank, so it is cached: the
    candidates of one step probe several ranks of the same matrix."""
    Wk = Wm[:, cols]
    tag = (key, S is not None) + tuple(None if m is None else np.packbits(m).tobytes() for m in (in_m, out_m))
    if S is not None:
        U, _, _ = probe.svd(tag, Wk @ whitener(S, cols))
    else:
        scale = np.sqrt(energy[cols] + 1e-12) if energy is not None else np.ones(cols.sum())
        U, _, _ = probe.svd(tag, Wk * scale)
    Ur = U[:, :rank].astype(np.float64)
    out = np.zeros_like(Wm)
    out[:, cols] = Ur @ (Ur.T @ Wk)
    return out


def layer_statistics(probe: WeightProbe, prev: dict[str, np.ndarray], reconstruct: bool) -> Stats:
    """The layer-input statistics under the weights ``prev`` (second moments where ``reconstruct``
    refits). The probe's cached SVDs were taken under other statistics: they are dropped."""
    probe.forget_svds()
    return probe.statistics(prev, set(probe.views) if reconstruct else set())


def emulate(probe: WeightProbe, plan: Plan, stats: Stats) -> tuple[dict[str, np.ndarray], Stats, float | None]:
    """The plan's weights, refit from the layer-input ``stats`` (:func:`layer_statistics` under the
    weights so far); the statistics used; and the weights' damage where telling refit from plain
    removal measured it (else None).

    Refits that make the outputs worse than plain removal are dropped: a tiny network's few
    calibration rows can make the least-squares problem ill-posed (weights 10x the original's,
    outputs off by orders of magnitude). They are judged on the sensitivity samples, which the
    refits never see."""
    weights = plan_weights(probe, plan, stats)
    if not stats.moments or not (plan.keep or plan.ranks):
        return weights, stats, None
    plain_stats = Stats(stats.energy, {}, stats.rows)
    plain = plan_weights(probe, plan, plain_stats)
    refit_damage, plain_damage = probe.damage(weights), probe.damage(plain)
    if plain_damage < refit_damage:
        log.info("least-squares refits dropped: output error %.4g with them, %.4g without",
                 refit_damage, plain_damage)
        return plain, plain_stats, plain_damage
    return weights, stats, refit_damage
