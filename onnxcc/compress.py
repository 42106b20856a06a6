"""The Collaborative Compression driver: measure → allocate → (repeat) → rewrite → verify.

The budget is MACs (``flops``: the fraction to remove) or latency (``latency``: the fraction of
the measured run time to remove, priced per plan by :class:`~onnxcc.latency_model.LatencyModel`).
Over ``steps`` steps the budget is approached gradually; each step re-measures every unit's
damage curve on the *partly compressed* model (emulated by weights fed to one onnxruntime
session), re-scores channels with the current activations, and re-solves the global allocation
for that step's target. With the latency model (the default) a rank is only offered where the
SVD pair runs faster than the dense Conv it replaces, at the widths of that moment, and dropped
at the end where pruning made it slower. The final plan is then applied physically: channel
pruning through whole groups, then SVD factorization of the pruned weights (as CC does: a fresh
SVD of the pruned weight keeps the r largest singular values).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from .allocate import fit_exponential, give_back, interpolate, land_near, outside, settle, solve
from .analysis.groups import Analysis
from .analysis.view import graph_inputs
from .calib import Calibration, ImagePreprocess, load_calibration
from .errors import TargetUnreachableError, UnsupportedModelError, UsageError
from .bench import benchmark
from .inspect import inspect_model, quantized_ops
from .io import load_model
from .latency import best_multiple, latency_table
from .latency_model import LatencyModel
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
    flops: float | None = None         # fraction of MACs to remove
    latency: float | None = None       # or: fraction of the measured latency to remove
    method: str = "cc"
    steps: int = 3
    provider: str = "cpu"
    seed: int = 0
    gamma: float = 0.9                 # weight of the remaining-compression-space look-ahead
    sens_samples: int = 16             # calibration samples per damage measurement (8 proved too noisy)
    fractions: tuple[float, ...] = (0.2, 0.45, 0.7, 1.0)  # 1.0: never extrapolate
    min_keep: float = 0.05             # a group keeps at least this fraction of its channels
    reconstruct: bool = True           # least-squares refit + activation-aware SVD (beyond CC)
    stat_samples: int = 32             # calibration samples for layer-input statistics
    round_to: int | None = None        # kept widths and ranks are multiples of this; None: measured
    threads: int = 0
    latency_aware: bool = True         # measure layer latencies; never keep a slower factorization
    speed_weight: float = 1.0          # under --flops: worth of a removal's latency share vs its MAC share

    def validate(self) -> None:
        if (self.flops is None) == (self.latency is None):
            raise UsageError("give exactly one target: --flops R or --latency R")
        name, r = ("--flops", self.flops) if self.flops is not None else ("--latency", self.latency)
        if not 0 < r < 1:
            raise UsageError(f"{name} must be in (0, 1), got {r}")
        if self.round_to is not None and self.round_to < 1:
            raise UsageError("--round-to must be at least 1")
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


@dataclass
class Budget:
    """What the target limits: MACs (``flops``) or predicted seconds (``latency``)."""

    kind: str                                          # "flops" | "latency"
    fraction: float                                    # share of ``total`` to remove
    total: float                                       # cost of the unmodified model
    cost: Callable[[dict[int, int], dict[str, int]], float]   # (kept, ranks) -> cost

    def target(self, share: float = 1.0) -> float:
        return self.total * (1 - self.fraction * share)

    def of(self, plan: Plan) -> float:
        return self.cost(plan.kept(), plan.ranks)


def compress(model: onnx.ModelProto | str | Path, flops: float | None = None,
             calib: str | Path | Calibration | None = None,
             input_shape: dict | None = None, method: str = "cc", steps: int = 3, provider: str = "cpu",
             seed: int = 0, progress: Progress | None = None, preprocess: ImagePreprocess | None = None,
             latency: float | None = None, **options: Any) -> CompressResult:
    """Compress ``model`` so that the fraction ``flops`` of its MACs (or ``latency`` of its
    measured run time) is removed.

    Returns the compressed model and a report (per layer before/after, damage curves, fidelity on
    held-back calibration samples, measured latencies). The input model is never modified.
    """
    cfg = CompressConfig(flops=flops, latency=latency, method=method, steps=steps, provider=provider,
                         seed=seed, **options)
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
    if cfg.round_to is None:
        cfg.round_to = best_multiple(provider, cfg.threads) if cfg.latency_aware else 16
    lat = _latency_model(a, ins.model, cfg, shapes, progress) if cfg.latency_aware or cfg.latency else None
    if lat is not None and not lat.surfaces:
        # only 2-D Convs are timed: a table without one prices every layer at zero
        if cfg.latency is not None:
            raise UnsupportedModelError("--latency needs 2-D Conv layers to time and the model has none; "
                                        "use --flops")
        log.info("no 2-D Conv layer to time: compressing without the latency model")
        lat = None
    budget = _budget(a, lat, cfg)
    _check_reachable(a, cfg, budget)
    # Slow factorizations are refused where something else can take their share of the budget;
    # the decompose ablation under a MAC budget has nothing else, so it keeps them.
    speed = lat if cfg.latency is not None or cfg.method == "cc" else None

    sens, stat = _sample_split(fit, cfg)
    probe = WeightProbe(a, ins.model, sens, provider, cfg.threads, batched=_dynamic_batch(original),
                        stat_feeds=stat)
    plan, curves, weights = Plan(), [], {}
    for step in range(1, cfg.steps + 1):
        plan, step_curves = _step(a, probe, plan, weights, cfg, budget, speed, step, progress)
        curves.append(step_curves)
        weights = _emulate(probe, plan, weights, cfg.reconstruct)[0]
    _drop_useless_ranks(a, plan, speed, strict=budget.kind == "flops")
    # Refit once more with statistics of the final plan, then make it physical: the emulated
    # weights go into the graph, pruning slices them, and a plain SVD at rank r recovers the
    # (already rank-r) factors exactly.
    weights = _emulate(probe, plan, weights, cfg.reconstruct)[0]
    reweighted = ReplaceInitializersPass(weights)(ins.model)
    pruned = PruneChannelsPass(a, plan.keep)(reweighted.model)
    fact = FactorizeConvPass(plan.ranks)(pruned.model)
    result = verify(ins.model, fact.model, held, shapes, provider)
    timing = _measure(original, fact.model, shapes, cfg, progress)
    report = _report(a, plan, cfg, curves, result, pruned.record, fact.record, data, lat, timing,
                     time.perf_counter() - t0)
    _warn_results(cfg, report)
    return CompressResult(fact.model, report, plan, weights)


def _latency_model(a: Analysis, model: onnx.ModelProto, cfg: CompressConfig, shapes: dict,
                   progress: Progress | None) -> LatencyModel:
    lat = LatencyModel(a, latency_table(cfg.provider, cfg.threads), cfg.round_to, progress)
    runs = benchmark([model], cfg.provider, cfg.threads, runs=30, warmup=3, input_shapes=shapes)
    # a low percentile: other processes only ever add time, and the table holds quiet numbers
    lat.calibrate(float(np.percentile(runs["models"][0]["latencies_ms"], 20)) / 1e3)
    return lat


def _budget(a: Analysis, lat: LatencyModel | None, cfg: CompressConfig) -> Budget:
    if cfg.latency is not None:
        return Budget("latency", cfg.latency, lat.seconds(), lat.seconds)
    return Budget("flops", cfg.flops, a.total_macs, a.macs)


def _measure(original: onnx.ModelProto, compressed: onnx.ModelProto, shapes: dict, cfg: CompressConfig,
             progress: Progress | None) -> dict[str, float]:
    """Interleaved latency of the original and the compressed model (what users compress for)."""
    if progress:
        progress("timing original vs compressed", 0, 1)
    b = benchmark([original, compressed], cfg.provider, cfg.threads, runs=40, warmup=3, input_shapes=shapes)
    if progress:
        progress("timing original vs compressed", 1, 1)
    before, after = (m["p50_ms"] for m in b["models"])
    return {"ms_before": round(before, 4), "ms_after": round(after, 4),
            "speedup": round(before / after, 4) if after > 0 else 0.0}


LOW_FIDELITY = 0.9   # held-out cosine below which the user is told the result is poor
# ... or relative L2 above what that cosine means at equal norms (√(2 − 2·0.9)): a cosine per
# sample says nothing of an output with one value per sample (a VAD's speech score)
HIGH_ERROR = 0.45


def _warn_results(cfg: CompressConfig, report: dict[str, Any]) -> None:
    t = report["totals"]
    f = report["fidelity"]
    for out in f.get("outputs", [f]):
        if out["cosine_mean"] < LOW_FIDELITY or out["rel_l2"] > HIGH_ERROR:
            log.warning("held-out fidelity is low%s: cosine %.3f, relative error %.3f; a smaller target, more "
                        "real calibration samples or fine-tuning (--finetune) would help",
                        f" on output {out['output']}" if "output" in out else "", out["cosine_mean"], out["rel_l2"])
    if cfg.flops is not None and abs(t["mac_reduction"] - cfg.flops) > 0.01:
        log.warning("achieved MAC reduction %.3f differs from the target %.3f by more than 1 point",
                    t["mac_reduction"], cfg.flops)
    if cfg.latency is not None:
        achieved = 1 - 1 / t["latency"]["speedup"] if t["latency"]["speedup"] > 0 else 0.0
        if achieved < cfg.latency - 0.05:
            log.warning("measured latency reduction %.3f falls short of the target %.3f (predicted %.3f): "
                        "timing noise or a latency table measured under other load", achieved, cfg.latency,
                        t["latency"]["predicted_reduction"])


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
    found = quantized_ops(model)
    if found:
        raise UnsupportedModelError(f"the model is already quantized ({', '.join(found)}); "
                                    "compress the float model, then quantize")
    if not any(n.op_type == "Conv" for n in model.graph.node):
        nested = any(n.op_type == "Conv" for n in _subgraph_nodes(model.graph))
        raise UnsupportedModelError(
            "the model's Convs all sit inside If/Loop/Scan branches, which onnxcc does not compress"
            if nested else "the model has no Conv layer: onnxcc compresses convolutional networks")


def _subgraph_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Nodes of the branches and bodies inside ``graph``, at any depth."""
    for n in graph.node:
        for attr in n.attribute:
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from g.node
                yield from _subgraph_nodes(g)


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
                m[:min(g.size, _allowed(_min_keep(cfg, g.size), g.size, cfg.round_to, g.size)[0])] = True
                plan.keep[gid] = m
    if cfg.method in ("cc", "decompose"):
        plan.ranks = {l.key: int(_allowed(1, l.max_useful_rank(), cfg.round_to, l.max_useful_rank())[0])
                      for l in a.layers if l.factorizable}
    return plan


def _check_reachable(a: Analysis, cfg: CompressConfig, budget: Budget) -> None:
    extreme = _extreme_plan(a, cfg)
    best = min(budget.of(extreme), budget.of(Plan(extreme.keep)))  # rank-1 pairs may be slow
    if best > budget.target():
        reach = 1 - best / budget.total
        what = "MACs" if budget.kind == "flops" else "predicted latency"
        raise TargetUnreachableError(
            f"--{budget.kind} {budget.fraction} is out of reach for this model with --method {cfg.method}: "
            f"at most {reach:.3f} of its {what} can be removed")


def _remove_lowest(mask: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    m = mask.copy()
    if k > 0:
        live = np.flatnonzero(m)
        m[live[np.argsort(scores[live], kind="stable")[:k]]] = False
    return m


def _allowed(lo: int, hi: int, multiple: int, size: int) -> np.ndarray:
    """Counts in [lo, hi] the backend runs well: multiples of ``multiple``, except for a channel
    group or rank range (of ``size``) that never reached one: below a block, a width costs
    nearly as much as the whole block and runs unblocked."""
    if hi < lo:
        return np.zeros(0, int)
    if size <= multiple:
        return np.arange(lo, hi + 1)
    return np.arange(max(lo + (-lo) % multiple, multiple), hi + 1, multiple)


def _thin(grid: np.ndarray, most: int = 65) -> np.ndarray:
    """At most ``most`` options (first and last kept): savings are exact at each, damage is
    interpolated between measurements anyway."""
    if len(grid) <= most:
        return grid
    return grid[np.unique(np.round(np.linspace(0, len(grid) - 1, most)).astype(int))]


def _emulate(probe: WeightProbe, plan: Plan, prev: dict[str, np.ndarray],
             reconstruct: bool) -> tuple[dict[str, np.ndarray], Stats, float | None]:
    """The plan's weights, refit from layer-input statistics under ``prev``; the statistics; and
    the weights' damage where telling refit from plain removal measured it (else None).

    Refits that make the outputs worse than plain removal are dropped: a tiny network's few
    calibration rows can make the least-squares problem ill-posed (weights 10x the original's,
    outputs off by orders of magnitude). They are judged on the sensitivity samples, which the
    refits never see."""
    stats = probe.statistics(prev, set(probe.views) if reconstruct else set())
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


TARGET_TOLERANCE = 0.004   # share of the total the last step may fall short by (twice it beyond) before grids get finer
STEP_OVERSHOOT = 0.5       # share of a step's budget a step before the last may remove beyond it
FINER_GRID_GAIN = 0.8      # a finer grid's plan must measure at most this share of a coarser one's damage


@dataclass
class _Unit:
    """One compression unit of a step: a channel group to prune or a Conv's rank."""

    kind: str                         # "prune" | "rank"
    unit: Any                         # group id | Layer
    touched: set[str]                 # layer keys whose emulated weights depend on it
    measured: list[int] = field(default_factory=list)   # amounts removed where damage was measured
    damage: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"group:{self.unit}" if self.kind == "prune" else f"rank:{self.unit.key}"


def _grid(a: Analysis, plan: Plan, cfg: CompressConfig, budget: Budget, lat: LatencyModel | None,
          scores: dict[int, np.ndarray], unit: _Unit, multiple: int) -> tuple[np.ndarray, Callable[[Plan, int], None]]:
    """The amounts ``unit`` may remove at this step (0 first), keeping widths or ranks at
    multiples of ``multiple``, and how to apply an amount to a plan."""
    kept = plan.kept()
    if unit.kind == "prune":
        gid, g = unit.unit, a.groups[unit.unit]
        n = kept.get(gid, g.size)
        mask = plan.keep.get(gid, np.ones(g.size, bool))
        remaining = _allowed(_min_keep(cfg, g.size), n - 1, multiple, g.size)

        def prune(p: Plan, k: int) -> None:
            p.keep[gid] = _remove_lowest(mask, scores[gid], int(k))
        return _thin(np.array([0] + sorted(n - remaining), int)), prune
    layer = unit.unit
    cin, cout = a.channels(layer, kept)
    current = plan.ranks.get(layer.key)
    upper = layer.max_useful_rank(cin, cout) if current is None else current - 1
    start = upper + 1 if current is None else current
    ranks = _allowed(1, upper, multiple, layer.max_useful_rank())
    if lat is not None:
        ranks = ranks[[_pays(a, lat, layer, kept, int(r), budget.kind == "flops") for r in ranks]]

    def factorize(p: Plan, k: int) -> None:
        if k > 0:
            p.ranks[layer.key] = int(start - k)
    return _thin(np.array([0] + sorted(start - ranks), int)), factorize


def _step(a: Analysis, probe: WeightProbe, plan: Plan, prev: dict[str, np.ndarray], cfg: CompressConfig,
          budget: Budget, lat: LatencyModel | None, step: int, progress: Progress | None) -> tuple[Plan, dict]:
    target = budget.target(step / cfg.steps)
    weights, stats, base = _emulate(probe, plan, prev, cfg.reconstruct)
    if base is None:
        base = probe.damage(weights) if (plan.keep or plan.ranks) else 0.0
    scores = channel_scores(probe, plan, weights, stats)
    probe.forget_svds()  # this step's weights and statistics differ from the last
    units = []
    if cfg.method in ("cc", "prune"):
        units += [_Unit("prune", gid, affected_layers(a, gid)) for gid, g in a.groups.items() if g.prunable]
    if cfg.method in ("cc", "decompose"):
        units += [_Unit("rank", l, affected_layers(a, l.key)) for l in a.layers if l.factorizable]
    coarse = [(u, *_grid(a, plan, cfg, budget, lat, scores, u, cfg.round_to)) for u in units]
    coarse = [(u, grid, apply) for u, grid, apply in coarse if len(grid) > 1]
    units = [u for u, _, _ in coarse]
    for u, grid, _ in coarse:
        kmax = int(grid[-1])
        u.measured = sorted({int(grid[np.argmin(np.abs(grid[1:] - f * kmax)) + 1]) for f in cfg.fractions})

    jobs = [(u, apply, k) for u, _, apply in coarse for k in u.measured]

    def candidate(u: _Unit, apply: Callable[[Plan, int], None], k: int) -> dict[str, np.ndarray]:
        cand = plan.copy()
        apply(cand, k)
        return plan_weights(probe, cand, stats, u.touched)

    done = iter(range(1, len(jobs) + 1))

    def tick() -> None:
        if progress:
            progress(f"step {step}/{cfg.steps}: measuring", next(done), len(jobs))
    damages = probe.damages(weights, [(u.touched, partial(candidate, u, apply, k)) for u, apply, k in jobs], tick)
    for (u, _, _), d in zip(jobs, damages):
        u.damage.append(d - base)
    if not units:
        return plan, {}

    # The budget is met on the backend-friendly grid when it can be; where its steps are too
    # coarse to land (narrow layers, small models), the same measurements are interpolated on
    # finer grids, down to single channels. Steps before the last may remove up to
    # STEP_OVERSHOOT of a step more than their share (the next step re-measures and takes
    # less); the last must land within the tolerance.
    slack = TARGET_TOLERANCE * budget.total
    over = 0.0 if step == cfg.steps else STEP_OVERSHOOT
    band = (min(target - 2 * slack, budget.target((step + over) / cfg.steps)), target + slack)
    landed, nearest = [], None
    for multiple in _finer(cfg.round_to):
        grids = ([(grid, apply) for _, grid, apply in coarse] if multiple == cfg.round_to
                 else [_grid(a, plan, cfg, budget, lat, scores, u, multiple) for u in units])
        new, curves = _allocate(a, plan, cfg, budget, lat, units, grids, multiple, band, target, step)
        miss = outside(budget.of(new), *band)
        if miss == (False, 0.0):
            landed.append((multiple, new, curves))
            if len(landed) == 2:
                break
        elif nearest is None or miss < nearest[0]:
            nearest = (miss, new, curves)
    if not landed:
        return nearest[1], nearest[2]
    return landed[0][1:] if len(landed) == 1 else _measured_pick(probe, stats, landed, step)


def _measured_pick(probe: WeightProbe, stats: Stats, landed: list[tuple[int, Plan, dict]],
                   step: int) -> tuple[Plan, dict]:
    """Of a coarse and a finer grid's landings (multiple, plan, curves), the finer only where
    its measured damage is clearly less. Damage predicted by adding units' standalone curves
    misjudges plans that cut several coupled layers deep, as the knapsack's combinations on a
    coarse grid can; the finer plan's in-between widths run no faster than the next multiple
    up, so they must buy fidelity."""
    (m_coarse, coarse_plan, coarse_curves), (m_fine, fine_plan, fine_curves) = landed
    if (coarse_plan.kept(), coarse_plan.ranks) == (fine_plan.kept(), fine_plan.ranks):
        return coarse_plan, coarse_curves
    d_coarse, d_fine = (probe.damage(plan_weights(probe, p, stats)) for p in (coarse_plan, fine_plan))
    log.info("step %d: measured damage %.4g on multiples of %d, %.4g on multiples of %d", step,
             d_coarse, m_coarse, d_fine, m_fine)
    return (fine_plan, fine_curves) if d_fine < FINER_GRID_GAIN * d_coarse else (coarse_plan, coarse_curves)


def _finer(multiple: int) -> list[int]:
    """``multiple``, then ever finer multiples down to 1."""
    out = [multiple]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def _allocate(a: Analysis, plan: Plan, cfg: CompressConfig, budget: Budget, lat: LatencyModel | None,
              units: list[_Unit], grids: list[tuple[np.ndarray, Callable[[Plan, int], None]]], multiple: int,
              band: tuple[float, float], target: float, step: int) -> tuple[Plan, dict]:
    """The smallest-damage plan of this step's options on ``grids`` (each unit's amounts at
    multiples of ``multiple``, see :func:`_grid`) whose cost lies in ``band``, and its curves."""
    kept, cost_now = plan.kept(), budget.of(plan)
    # Under a MAC budget the latency model still steers *which* MACs go: an option is worth its
    # share of the MACs plus its share of the run time, so of two removals equally harmless the
    # one that buys more speed wins; the budget itself stays exact MACs. Shares of the table's
    # seconds, not of the calibrated total: the live timing behind the calibration varies with
    # the machine's load, and the same command must give the same plan.
    blend = budget.kind == "flops" and lat is not None
    seconds_now, seconds_total = (lat.layers_seconds(kept, plan.ranks), lat.layers_seconds()) if blend else (0.0, 1.0)
    options, savings, appliers, curves = [], [], [], {}
    for u, (grid, apply) in zip(units, grids):
        saving, worth = np.empty(len(grid)), np.empty(len(grid))
        for i, k in enumerate(grid):
            cand = plan.copy()
            apply(cand, k)
            saving[i] = cost_now - budget.of(cand)
            worth[i] = saving[i] / budget.total + (cfg.speed_weight * (
                seconds_now - lat.layers_seconds(cand.kept(), cand.ranks)) / seconds_total if blend else 0.0)
        options.append(interpolate(u.name, u.measured, u.damage, grid, worth, cfg.gamma))
        savings.append(saving)
        appliers.append(apply)
        at = np.interp(u.measured, grid, saving) / budget.total
        curves[u.name] = {"removed": [int(k) for k in u.measured], "damage": [float(d) for d in u.damage],
                          "saved_fraction": [float(x) for x in at], "fit_p1_p2": fit_exponential(at, u.damage)}

    def build(choice: list[int]) -> Plan:
        p = plan.copy()
        for apply, opt, c in zip(appliers, options, choice):
            if c:
                apply(p, opt.amounts[c])
        _drop_useless_ranks(a, p, lat, budget.kind == "flops")  # pruning may have made a rank useless
        return p

    def cost_of(choice: list[int]) -> float:
        return budget.of(build(choice))

    choice, lam = solve(options, cost_of, target)
    choice = land_near(options, give_back(options, choice, cost_of, target), cost_of, target,
                       TARGET_TOLERANCE * budget.total)
    # λ's plans are the hull of the units' curves; where the hull steps over the band the exact
    # knapsack finds the combinations between. It charges damage alone: λ from a coarse grid's
    # last jump can be many times the marginal damage, and its speed bonus would outweigh it.
    new = build(settle(savings, [o.damage for o in options], cost_of, cost_now, *band, choice))
    log.info("step %d (multiples of %d): %s cost %.4g -> %.4g (target %.4g), lambda %.3g", step, multiple,
             budget.kind, cost_now, budget.of(new), target, lam)
    return new, curves


def _pays(a: Analysis, lat: LatencyModel, layer, kept: dict[int, int], rank: int, strict: bool) -> bool:
    """Is the SVD pair at ``rank`` faster than the dense layer at these widths? ``strict`` (MAC
    budgets): faster than the dense layer would be with the pair's MACs, i.e. at least as fast
    per MAC — otherwise pruning the same MACs elsewhere buys more speed, and under a MAC budget
    that is the alternative."""
    dense = lat.layer_seconds(layer, kept)
    if strict:
        dense *= a.layer_macs(layer, kept, rank) / max(a.layer_macs(layer, kept), 1.0)
    return lat.layer_seconds(layer, kept, rank) < dense


def _drop_useless_ranks(a: Analysis, plan: Plan, lat: LatencyModel | None = None, strict: bool = False) -> None:
    """A rank that no longer saves MACs on the pruned layer — or, with the latency model, runs
    slower than the dense layer — would only add a conv: drop it."""
    kept = plan.kept()
    for key in list(plan.ranks):
        layer = a.layer(key)
        slower = lat is not None and not _pays(a, lat, layer, kept, plan.ranks[key], strict)
        if slower or a.layer_macs(layer, kept, plan.ranks[key]) >= a.layer_macs(layer, kept):
            del plan.ranks[key]


def _report(a: Analysis, plan: Plan, cfg: CompressConfig, curves, verification, prune_rec, fact_rec,
            data: Calibration, lat: LatencyModel | None, timing: dict[str, float],
            seconds: float) -> dict[str, Any]:
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
        if lat is not None:
            layers[-1]["predicted_ms"] = [round(lat.layer_seconds(l, {}) * 1e3, 5),
                                          round(lat.layer_seconds(l, kept, rank) * 1e3, 5)]
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
            "latency": {**timing, **_predicted(lat, plan)},
            "seconds": round(seconds, 1),
        },
        "fidelity": verification["fidelity"],
        "layers": layers, "groups": groups, "sensitivity": curves,
    }


def _predicted(lat: LatencyModel | None, plan: Plan) -> dict[str, float]:
    if lat is None:
        return {}
    before, after = lat.seconds(), lat.seconds(plan.kept(), plan.ranks)
    return {"predicted_ms_before": round(before * 1e3, 4), "predicted_ms_after": round(after * 1e3, 4),
            "predicted_reduction": round(1 - after / before, 4)}
