"""The Collaborative Compression driver: measure → allocate → (repeat) → rewrite → verify.

Over ``steps`` steps the MAC budget is approached gradually; each step re-measures every unit's
damage curve on the *partly compressed* model (emulated by weights fed to one onnxruntime
session), re-scores channels with the current activations, and re-solves the global allocation
for that step's target. The final plan is then applied physically: channel pruning through
whole groups, then SVD factorization of the pruned weights (as CC does: a fresh SVD of the
pruned weight keeps the r largest singular values).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .allocate import fit_exponential, give_back, interpolate, solve
from .analysis.groups import Analysis
from .analysis.view import graph_inputs
from .calib import Calibration, ImagePreprocess, load_calibration
from .errors import TargetUnreachableError, UnsupportedModelError, UsageError
from .inspect import inspect_model, is_quantized
from .io import load_model
from .passes.factorize import FactorizeConvPass
from .passes.weights import ReplaceInitializersPass
from .passes.prune import PruneChannelsPass
from .sensitivity import Plan, Stats, WeightProbe, affected_layers, channel_scores, plan_weights
from .verify import verify

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
METHODS = ("cc", "prune", "decompose")


@dataclass
class CompressConfig:
    flops: float
    method: str = "cc"
    steps: int = 3
    provider: str = "cpu"
    seed: int = 0
    gamma: float = 0.9                 # weight of the remaining-compression-space look-ahead
    sens_samples: int = 8              # calibration samples per damage measurement
    fractions: tuple[float, ...] = (0.2, 0.45, 0.7, 1.0)  # 1.0: never extrapolate
    min_keep: float = 0.05             # a group keeps at least this fraction of its channels
    reconstruct: bool = True           # least-squares refit + activation-aware SVD (beyond CC)
    stat_samples: int = 32             # calibration samples for layer-input statistics
    round_to: int = 16                 # kept widths and ranks are multiples of this (backend speed)
    threads: int = 0

    def validate(self) -> None:
        if not 0 < self.flops < 1:
            raise UsageError(f"--flops must be in (0, 1), got {self.flops}")
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}")
        if self.steps < 1:
            raise UsageError("--steps must be at least 1")


@dataclass
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    plan: Plan = field(default_factory=Plan)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # emulated weights made physical


def compress(model: onnx.ModelProto | str | Path, flops: float, calib: str | Path | Calibration | None = None,
             input_shape: dict | None = None, method: str = "cc", steps: int = 3, provider: str = "cpu",
             seed: int = 0, progress: Progress | None = None, preprocess: ImagePreprocess | None = None,
             **options: Any) -> CompressResult:
    """Compress ``model`` so that the fraction ``flops`` of its MACs is removed.

    Returns the compressed model and a report (per layer before/after, damage curves, fidelity on
    held-back calibration samples). The input model is never modified.
    """
    cfg = CompressConfig(flops=flops, method=method, steps=steps, provider=provider, seed=seed, **options)
    cfg.validate()
    t0 = time.perf_counter()
    original = model if isinstance(model, onnx.ModelProto) else load_model(model)
    _check_model(original)
    data = calib if isinstance(calib, Calibration) else load_calibration(
        original, calib, pinned=input_shape, seed=seed, preprocess=preprocess)
    fit, held = data.split()
    shapes = {k: (1,) + tuple(v.shape[1:]) for k, v in data.samples.items()}
    ins = inspect_model(original, shapes, feeds=fit.take(slice(0, 1)))
    a = ins.analysis
    target = int(round(a.total_macs * (1 - flops)))
    _check_reachable(a, cfg, target)

    sens, stat = _sample_split(fit, cfg)
    probe = WeightProbe(a, ins.model, sens, provider, cfg.threads, batched=_dynamic_batch(original),
                        stat_feeds=stat)
    plan, curves, weights = Plan(), [], {}
    for step in range(1, cfg.steps + 1):
        step_target = int(round(a.total_macs * (1 - flops * step / cfg.steps)))
        plan, step_curves = _step(a, probe, plan, weights, cfg, step_target, step, progress)
        curves.append(step_curves)
        weights = plan_weights(probe, plan, _statistics(probe, weights, cfg.reconstruct))
    _drop_useless_ranks(a, plan)
    # Refit once more with statistics of the final plan, then make it physical: the emulated
    # weights go into the graph, pruning slices them, and a plain SVD at rank r recovers the
    # (already rank-r) factors exactly.
    weights = plan_weights(probe, plan, _statistics(probe, weights, cfg.reconstruct))
    reweighted = ReplaceInitializersPass(weights)(ins.model)
    pruned = PruneChannelsPass(a, plan.keep)(reweighted.model)
    fact = FactorizeConvPass(plan.ranks)(pruned.model)
    result = verify(ins.model, fact.model, held, shapes, provider)
    report = _report(a, plan, cfg, curves, result, pruned.record, fact.record, data, time.perf_counter() - t0)
    achieved = report["totals"]["mac_reduction"]
    if abs(achieved - flops) > 0.01:
        log.warning("achieved MAC reduction %.3f differs from the target %.3f by more than 1 point",
                    achieved, flops)
    return CompressResult(fact.model, report, plan, weights)


def _sample_split(fit: Calibration, cfg: CompressConfig) -> tuple[dict, dict]:
    """Damage is measured on samples the refit did not see, when there are enough of them."""
    n = len(fit)
    k = min(cfg.sens_samples, n)
    if n - k >= 8:
        return fit.take(slice(0, k)), fit.take(slice(k, k + cfg.stat_samples))
    log.warning("only %d calibration samples: weight refits are measured on the samples they were "
                "fitted to; give 40 or more for honest measurements", n)
    return fit.take(slice(0, k)), fit.take(slice(0, min(cfg.stat_samples, n)))


def _check_model(model: onnx.ModelProto) -> None:
    if is_quantized(model):
        raise UnsupportedModelError("the model is already quantized (QuantizeLinear/QLinearConv...); "
                                    "compress the float model, then quantize")
    if not any(n.op_type == "Conv" for n in model.graph.node):
        raise UnsupportedModelError("the model has no Conv layer: onnxcc compresses convolutional networks")


def _dynamic_batch(model: onnx.ModelProto) -> bool:
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            return False
    return True


def _min_keep(cfg: CompressConfig, size: int) -> int:
    return max(1, int(np.ceil(cfg.min_keep * size)))


def _extreme_plan(a: Analysis, cfg: CompressConfig) -> Plan:
    plan = Plan()
    if cfg.method in ("cc", "prune"):
        for gid, g in a.groups.items():
            if g.prunable:
                m = np.zeros(g.size, bool)
                m[:_min_keep(cfg, g.size)] = True
                plan.keep[gid] = m
    if cfg.method in ("cc", "decompose"):
        plan.ranks = {l.key: 1 for l in a.layers if l.factorizable}
    return plan


def _check_reachable(a: Analysis, cfg: CompressConfig, target: int) -> None:
    extreme = _extreme_plan(a, cfg)
    best = a.macs(extreme.kept(), extreme.ranks)
    if best > target:
        reach = 1 - best / a.total_macs
        raise TargetUnreachableError(
            f"--flops {cfg.flops} is out of reach for this model with --method {cfg.method}: "
            f"at most {reach:.3f} of its MACs can be removed")


def _remove_lowest(mask: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    m = mask.copy()
    if k > 0:
        live = np.flatnonzero(m)
        m[live[np.argsort(scores[live], kind="stable")[:k]]] = False
    return m


def _allowed(lo: int, hi: int, multiple: int) -> np.ndarray:
    """Counts in [lo, hi] the backend runs well: multiples of ``multiple`` once there is room."""
    if hi < lo:
        return np.zeros(0, int)
    if hi < multiple:
        return np.arange(lo, hi + 1)
    return np.arange(max(lo + (-lo) % multiple, multiple), hi + 1, multiple)


def _thin(grid: np.ndarray, most: int = 65) -> np.ndarray:
    """At most ``most`` options (first and last kept): savings are exact at each, damage is
    interpolated between measurements anyway."""
    if len(grid) <= most:
        return grid
    return grid[np.unique(np.round(np.linspace(0, len(grid) - 1, most)).astype(int))]


def _statistics(probe: WeightProbe, weights: dict[str, np.ndarray], reconstruct: bool) -> Stats:
    """Layer-input statistics under ``weights``; full second moments when reconstructing."""
    return probe.statistics(weights, set(probe.views) if reconstruct else set())


def _step(a: Analysis, probe: WeightProbe, plan: Plan, prev: dict[str, np.ndarray], cfg: CompressConfig,
          target: int, step: int, progress: Progress | None) -> tuple[Plan, dict]:
    stats = _statistics(probe, prev, cfg.reconstruct)
    weights = plan_weights(probe, plan, stats)
    base = probe.damage(weights) if (plan.keep or plan.ranks) else 0.0
    scores = channel_scores(probe, plan, weights, stats)
    probe.forget_svds()  # this step's weights and statistics differ from the last
    kept, macs_now = plan.kept(), a.macs(plan.kept(), plan.ranks)
    units: list[tuple[str, Any]] = []
    if cfg.method in ("cc", "prune"):
        units += [("prune", gid) for gid, g in a.groups.items() if g.prunable]
    if cfg.method in ("cc", "decompose"):
        units += [("rank", l) for l in a.layers if l.factorizable]
    jobs = []
    for kind, u in units:
        if kind == "prune":
            g = a.groups[u]
            n = kept.get(u, g.size)
            remaining = _allowed(_min_keep(cfg, g.size), n - 1, cfg.round_to)
            grid = np.array([0] + sorted(n - remaining), int)
            mask = plan.keep.get(u, np.ones(g.size, bool))
            apply = (lambda p, k, u=u, mask=mask: p.keep.__setitem__(u, _remove_lowest(mask, scores[u], int(k))))
        else:
            layer = u
            cin, cout = a.channels(layer, kept)
            current = plan.ranks.get(layer.key)
            upper = layer.max_useful_rank(cin, cout) if current is None else current - 1
            start = upper + 1 if current is None else current
            ranks = _allowed(1, upper, cfg.round_to)
            grid = np.array([0] + sorted(start - ranks), int)
            apply = (lambda p, k, key=layer.key, start=start: p.ranks.__setitem__(key, int(start - k)) if k > 0 else None)
        if len(grid) < 2:
            continue
        grid = _thin(grid)
        kmax = int(grid[-1])
        measured = sorted({int(grid[np.argmin(np.abs(grid[1:] - f * kmax)) + 1]) for f in cfg.fractions})
        jobs.append((kind, u, grid, apply, measured, affected_layers(a, u if kind == "prune" else u.key)))

    total = sum(len(j[4]) for j in jobs)
    done = 0
    options, curves = [], {}
    for kind, u, grid, apply, measured, touched in jobs:
        dmg = []
        for k in measured:
            cand = plan.copy()
            apply(cand, k)
            dmg.append(probe.damage({**weights, **plan_weights(probe, cand, stats, touched)}) - base)
            done += 1
            if progress:
                progress(f"step {step}/{cfg.steps}: measuring", done, total)
        saving = np.empty(len(grid))
        for i, k in enumerate(grid):
            cand = plan.copy()
            apply(cand, k)
            saving[i] = macs_now - a.macs(cand.kept(), cand.ranks)
        name = f"group:{u}" if kind == "prune" else f"rank:{u.key}"
        options.append(interpolate(name, measured, dmg, grid, saving, cfg.gamma))
        curves[name] = {"removed": [int(k) for k in measured], "damage": [float(d) for d in dmg],
                        "macs_saved": [float(np.interp(k, grid, saving)) for k in measured],
                        "fit_p1_p2": fit_exponential(np.interp(measured, grid, saving) / max(a.total_macs, 1), dmg)}

    appliers = [j[3] for j in jobs]

    def build(choice: list[int]) -> Plan:
        p = plan.copy()
        for apply, opt, c in zip(appliers, options, choice):
            if c:
                apply(p, opt.amounts[c])
        _drop_useless_ranks(a, p)  # a rank chosen alongside pruning may no longer pay
        return p

    def macs_of(choice: list[int]) -> int:
        p = build(choice)
        return a.macs(p.kept(), p.ranks)

    if not options:
        return plan, curves
    choice, lam = solve(options, macs_of, target)
    choice = give_back(options, choice, macs_of, target)
    new = build(choice)
    log.info("step %d: MACs %d -> %d (target %d), lambda %.3g", step, macs_now, macs_of(choice), target, lam)
    return new, curves


def _drop_useless_ranks(a: Analysis, plan: Plan) -> None:
    """A rank that no longer saves MACs on the pruned layer would only add a conv: drop it."""
    kept = plan.kept()
    for key in list(plan.ranks):
        layer = a.layer(key)
        if a.layer_macs(layer, kept, plan.ranks[key]) >= a.layer_macs(layer, kept):
            del plan.ranks[key]


def _report(a: Analysis, plan: Plan, cfg: CompressConfig, curves, verification, prune_rec, fact_rec,
            data: Calibration, seconds: float) -> dict[str, Any]:
    kept = plan.kept()
    layers = []
    for l in a.layers:
        rank = plan.ranks.get(l.key)
        cin, cout = a.channels(l, kept)
        layers.append({
            "name": l.name, "tensor": l.key, "op": l.op, "kernel": list(l.kernel),
            "in_channels": [l.cin, cin], "out_channels": [l.cout, cout],
            "rank": [min(l.cout, l.cin * l.kk) if l.op == "Conv" else None, rank],
            "macs": [int(l.macs), int(round(a.layer_macs(l, kept, rank)))],
        })
    groups = {str(gid): {"channels": [a.groups[gid].size, int(m.sum())],
                         "removed": [int(i) for i in np.flatnonzero(~m)]}
              for gid, m in plan.keep.items() if not m.all()}
    macs_after = verification["macs"]
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "calibration": {"source": data.source, "samples": len(data), "synthetic": data.synthetic},
        "totals": {
            "macs_before": int(a.total_macs), "macs_after": int(macs_after),
            "mac_reduction": round(1 - macs_after / a.total_macs, 4),
            "planned_macs_after": int(a.macs(kept, plan.ranks)),
            "params_before": verification["params_before"], "params_after": verification["params_after"],
            "channels_removed": int(prune_rec.channels_removed), "layers_factorized": len(fact_rec.layers),
            "seconds": round(seconds, 1),
        },
        "fidelity": verification["fidelity"],
        "layers": layers, "groups": groups, "sensitivity": curves,
    }
