"""The Collaborative Compression driver: load → analyse → search a plan → rewrite → verify.

The budget is MACs (``flops``: the fraction to remove) or latency (``latency``: the fraction of
the measured run time to remove, priced per plan by :class:`~onnxcc.latency_model.LatencyModel`).
:mod:`onnxcc.search` finds the plan over ``steps`` measured steps. The final plan is then applied
physically: channel pruning through whole groups, then SVD factorization of the pruned weights
(as CC does: a fresh SVD of the pruned weight keeps the r largest singular values).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from .analysis.groups import Analysis
from .analysis.view import batch_fixed_at_one
from .benchmark import benchmark
from .calib import Calibration, ImagePreprocess, load_calibration
from .config import Budget, CompressConfig, Progress
from .errors import FidelityError, ResourceError, TargetUnreachableError, UnsupportedModelError
from .footprint import Footprint, estimate as estimate_footprint
from .memory import available_bytes, peak_rss_bytes
from .inspect import inspect_model, quantized_ops
from .io import load_model
from .latency import best_multiple, latency_table
from .latency_model import LatencyModel
from .analysis.costs import model_params
from .passes.base import Sequence
from .passes.check import CheckPass
from .passes.factorize import FactorizeConvPass
from .passes.prune import PruneChannelsPass
from .passes.weights import ReplaceInitializersPass
from .recover import channel_map, recover_checked, with_channel_map
from .report import build_report
from .resume import SearchCheckpoint, fingerprint
from .runtime import make_session
from .search import (RUN_BATCH, Plan, SearchContext, SearchSize, SearchTuning, WeightProbe, check_reachable,
                     search_plan, size_search, tries_for)
from .search.allocation import faithful_share
from .verify import fidelity

log = logging.getLogger(__name__)

PICK_SAMPLES = 128   # calibration samples the tries' plans are compared on (all of them, up to this)
TIMING_SECONDS = 15.0  # a whole-model timing stops after the round that passes this, so timing a
                       # big model costs seconds, not minutes; small ones still get every run
SLOW_SEARCH = 150.0  # seconds: a first search slower than this is not repeated by default


@dataclass
class CompressResult:
    model: onnx.ModelProto
    report: dict[str, Any]
    plan: Plan = field(default_factory=Plan)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # emulated weights made physical
    stages: dict[str, onnx.ModelProto] = field(default_factory=dict)  # the model after the cut and each recovery stage


def compress(model: onnx.ModelProto | str | Path, flops: float | None = None,
             calib: str | Path | Calibration | None = None, input_shape: dict | None = None, *,
             latency: float | None = None, progress: Progress | None = None,
             preprocess: ImagePreprocess | None = None, config: CompressConfig | None = None,
             checkpoint: str | Path | None = None, resume: bool = False, **settings: Any) -> CompressResult:
    """Compress ``model`` so that the fraction ``flops`` of its MACs (or ``latency`` of its
    measured run time) is removed.

    ``config`` holds the settings (:class:`CompressConfig`); keyword ``settings`` override its
    fields (``method="prune", steps=1``). Returns the compressed model and a report (per layer
    before/after, damage curves, fidelity on held-back calibration samples, measured latencies).
    The input model is never modified. With ``checkpoint`` (a folder) every finished search step
    is kept there, and ``resume`` continues a killed run from them (:mod:`onnxcc.resume`).
    """
    targets = {k: v for k, v in (("flops", flops), ("latency", latency)) if v is not None}
    cfg = replace(config or CompressConfig(), **targets, **settings)
    cfg.validate()
    t0 = time.perf_counter()
    original = model if isinstance(model, onnx.ModelProto) else load_model(model)
    _check_model(original)
    data = calib if isinstance(calib, Calibration) else load_calibration(
        original, calib, pinned=input_shape, seed=cfg.seed, preprocess=preprocess)
    fit, held = data.split()
    shapes = {k: (1,) + tuple(v.shape[1:]) for k, v in data.samples.items()}
    ins = inspect_model(original, shapes, feeds=fit.take(slice(0, 1)))
    a = ins.analysis
    ckpt = (SearchCheckpoint(checkpoint, fingerprint(original, data.samples, _search_settings(cfg, shapes)), resume)
            if checkpoint is not None else None)
    work = _Work(a, ins.model, fit, shapes, not batch_fixed_at_one(original), progress, ckpt)
    if cfg.round_to is None:
        cfg.round_to = (work.measured("round_to", lambda: best_multiple(cfg.provider, cfg.threads)) if cfg.latency_aware
                        else SearchTuning.round_to)
    if cfg.min_keep is None:   # the user's target's floor, also where --latency searches again for another
        cfg.min_keep = SearchTuning.of(cfg).min_keep
    lat = _latency_model(work, cfg) if cfg.latency_aware or cfg.latency else None
    if lat is not None and not lat.surfaces:
        # only 2-D Convs are timed: a table without one prices every layer at zero
        if cfg.latency is not None:
            raise UnsupportedModelError("--latency needs 2-D Conv layers to time and the model has none; "
                                        "use --flops")
        log.info("no 2-D Conv layer to time: compressing without the latency model")
        lat = None
    budget = _budget(a, lat, cfg)
    check_reachable(a, SearchTuning.of(cfg), budget)
    # Slow factorizations are refused where something else can take their share of the budget;
    # the decompose ablation under a MAC budget has nothing else, so it keeps them.
    speed = lat if cfg.latency is not None or cfg.method == "cc" else None

    memory = _check_memory(work, data, cfg)
    cfg, size = _size_search(work, cfg)
    found, search = _best_search(work, cfg, budget, speed)
    if cfg.latency is not None:
        found, search = _meet_latency(work, cfg, lat, found, search)
    search["estimated_seconds"] = round(size.estimated_seconds, 1)
    if size.asked_seconds > size.estimated_seconds:
        search["full_size_estimated_seconds"] = round(size.asked_seconds, 1)
    plan, curves, weights = found
    # The emulated weights go into the graph, pruning slices them, and a plain SVD at rank r
    # recovers the (already rank-r) factors exactly. The check ends the rewrite and, as recovery
    # changes only weights, holds after it too.
    check = CheckPass(shapes, held.take(slice(0, 1)), macs=int(a.macs(plan.kept(), plan.ranks)),
                      max_params=model_params(original))
    rewrite = Sequence(*_rewrite_passes(a, plan, weights), check, name="rewrite")(ins.model)
    tensors = [o for n in rewrite.model.graph.node for o in n.output]
    with_channel_map(rewrite.model, channel_map(a, plan.keep, tensors))
    recovered = recover_checked(rewrite.model, ins.model, fit, held, mode=cfg.recover or "blocks",
                                seconds=cfg.recover_seconds, macs=check.macs, seed=cfg.seed,
                                provider=cfg.provider, device=cfg.device, progress=progress, teacher_normalized=True)
    final = check(recovered.model)
    timing = _measure(original, recovered.model, shapes, cfg, progress)
    report = build_report(a, plan, cfg, curves, rewrite.record, final.record,
                          fidelity(ins.model, recovered.model, held, cfg.provider), data, lat, timing, search,
                          time.perf_counter() - t0)
    report["recovery"] = recovered.record
    report["memory"] = {"estimated_gb": round(memory.total / 2**30, 2),
                        "peak_rss_gb": round(peak_rss_bytes() / 2**30, 2), "parts": memory.parts}
    _judge_results(cfg, report)
    return CompressResult(recovered.model, report, plan, weights, recovered.stages)


@dataclass
class _Work:
    """What one run's search phase works on, passed as one."""

    analysis: Analysis
    model: onnx.ModelProto              # the normalized model
    fit: Calibration                    # the calibration samples not held back
    shapes: dict[str, tuple[int, ...]]  # one sample's input shapes
    batched: bool                       # whether the model runs batches of samples
    progress: Progress | None
    checkpoint: SearchCheckpoint | None

    def measured(self, name: str, measure: Callable[[], Any]) -> Any:
        """``measure()``, or what the checkpoint kept of it (a resumed run decides as the killed one did)."""
        return self.checkpoint.measured(name, measure) if self.checkpoint else measure()


Found = tuple[Plan, list[dict], dict[str, np.ndarray]]   # a search's plan, damage curves, emulated weights
LATENCY_TOLERANCE = 0.02   # the measured latency reduction may miss --latency by this much ...
LATENCY_SEARCHES = 3       # ... before the search runs again, up to this many searches in all


def _meet_latency(work: _Work, cfg: CompressConfig, lat: LatencyModel, found: Found,
                  search: dict[str, Any]) -> tuple[Found, dict[str, Any]]:
    """--latency is priced by the latency model, whose per-layer sums miss what a rewritten
    network really saves (open-nsfw: 50% predicted, 60% measured). Each plan's model is built and
    timed against the original; while the nearest misses the target by more than
    LATENCY_TOLERANCE, the search runs again for a predicted target moved by the misses: first
    by what the miss says about the remaining time, then along the line through the last two
    (predicted, measured) points. The plan measured nearest the target is kept."""
    def measured(f: Found) -> tuple[float, float]:
        plan, _, weights = f
        built = Sequence(*_rewrite_passes(work.analysis, plan, weights), name="rewrite")(work.model).model
        timing = _measure(work.model, built, work.shapes, cfg, work.progress)
        return 1 - lat.seconds(plan.kept(), plan.ranks) / lat.seconds(), 1 - timing["ms_after"] / timing["ms_before"]

    goal = cfg.latency
    tried = [(*measured(found), found, search)]
    rounds = [{"asked": goal, "predicted": round(tried[0][0], 4), "measured": round(tried[0][1], 4)}]
    while len(tried) < LATENCY_SEARCHES:
        best = min(tried, key=lambda t: abs(t[1] - goal))
        if abs(best[1] - goal) <= LATENCY_TOLERANCE:
            break
        p, r = tried[-1][:2]
        if len(tried) == 1:
            asked = 1 - (1 - p) * (1 - goal) / (1 - r) if r < 1 else goal
        else:
            p0, r0 = tried[-2][:2]
            if r0 == r:
                break
            asked = p0 + (goal - r0) * (p - p0) / (r - r0)
        retry = replace(cfg, latency=float(np.clip(asked, 0.01, 0.99)))
        log.info("--latency %s: the plan measures %.1f%% less latency (%.1f%% predicted); searching again for "
                 "%.1f%% predicted", goal, 100 * r, 100 * p, 100 * retry.latency)
        budget = _budget(work.analysis, lat, retry)
        try:
            check_reachable(work.analysis, SearchTuning.of(retry), budget)
        except (TargetUnreachableError, UnsupportedModelError):   # the nearest plan found stays
            break
        again = _best_search(work, retry, budget, lat, first=100 * len(tried) + 1)
        tried.append((*measured(again[0]), *again))
        rounds.append({"asked": round(retry.latency, 4), "predicted": round(tried[-1][0], 4),
                       "measured": round(tried[-1][1], 4)})
    kept = min(range(len(tried)), key=lambda i: abs(tried[i][1] - goal))
    _, _, found, search = tried[kept]
    return found, {**search, "latency_rounds": rounds, "latency_kept": kept + 1}


def _rewrite_passes(a: Analysis, plan: Plan, weights: dict[str, np.ndarray]) -> list:
    """The plan made physical: its emulated weights, then pruning, then factorization."""
    return [ReplaceInitializersPass(weights), PruneChannelsPass(a, plan.keep), FactorizeConvPass(plan.ranks)]


def _best_search(work: _Work, cfg: CompressConfig, budget: Budget, speed: LatencyModel | None,
                 first: int = 1) -> tuple[Found, dict[str, Any]]:
    """The plan of the search (of ``tries_for`` searches, each on its own split of ``fit``) whose
    weights do least damage on the calibration samples; a record of the tries. ``first``: the
    checkpoint's number of the first search."""
    a, model, fit, ckpt, batched = work.analysis, work.model, work.fit, work.checkpoint, work.batched
    tries = tries_for(a, cfg, len(fit))
    found = []
    for t in range(tries):
        started = time.perf_counter()
        steps = ckpt.steps_of(first + t) if ckpt else None
        sens, stat = _sample_split(fit, cfg, t, tries)
        probe = WeightProbe(a, model, sens, cfg.provider, cfg.threads, batched=batched, stat_feeds=stat)
        if cfg.ray_address:
            probe.on_ray(cfg.ray_address, cfg.ray_workers)
        try:
            ctx = SearchContext(a, probe, budget, SearchTuning.of(cfg), speed, _tagged(work.progress, t, tries))
            found.append(search_plan(ctx, steps))
        finally:
            probe.close()
        seconds = steps.seconds() if steps else time.perf_counter() - started
        if t == 0:
            timed = {"first_search_seconds": round(seconds, 1)}
        if t == 0 and tries > 1 and cfg.tries is None and seconds > SLOW_SEARCH:
            # the cost proxy misses activation-heavy models (CenterFace at 384×512: 8× open-nsfw's
            # seconds per proxy unit); a search this slow is not repeated unless asked for
            log.info("the first search took %.0f s: no more searches (--tries %d to insist)", seconds, tries)
            tries = 1
            break
    if tries == 1:
        return found[0], {"tries": 1, "damages": [], "kept": 1, **timed}
    judge = WeightProbe(a, model, fit.take(slice(0, PICK_SAMPLES)), cfg.provider, cfg.threads, batched=batched)
    damages = [judge.damage(weights) for _, _, weights in found]
    pick, samples = int(np.argmin(damages)), min(len(fit), PICK_SAMPLES)
    log.info("damage on %d calibration samples per try: %s; keeping try %d", samples,
             ", ".join(f"{d:.4g}" for d in damages), pick + 1)
    return found[pick], {"tries": tries, "samples": samples, "damages": [round(d, 6) for d in damages],
                         "kept": pick + 1, **timed}


def _size_search(work: _Work, cfg: CompressConfig) -> tuple[CompressConfig, SearchSize]:
    """``cfg`` with the steps and samples per measurement :func:`size_search` gives the time of
    one sample's run (kept by the checkpoint: a resumed run sizes itself as the killed one did);
    says what the search is estimated to take, and what it gave up to fit ``search_seconds``."""
    size = size_search(work.analysis, cfg, work.measured("sample_seconds", lambda: _sample_seconds(work, cfg)),
                       len(work.fit), cfg.ray_workers if cfg.ray_address else 1)
    sized = replace(cfg, steps=size.steps, sens_samples=size.sens_samples)
    tries = tries_for(work.analysis, sized, len(work.fit))
    total = size.estimated_seconds * tries
    line = f"search: ~{total:.0f} s of measuring estimated" if total < 90 else \
        f"search: ~{total / 60:.0f} min of measuring estimated"
    if size.asked_seconds > size.estimated_seconds:
        line += (f" ({size.steps} step(s) on {size.sens_samples} samples per measurement to fit --search-time "
                 f"{cfg.search_seconds:.0f} s, from ~{size.asked_seconds / 60:.0f} min)")
    log.info("%s; %d search(es)", line, tries)
    if work.progress:
        work.progress(line, 0, 1)
    return sized, size


def _check_memory(work: _Work, data: Calibration, cfg: CompressConfig) -> Footprint:
    """The search's estimated peak (``data``: all calibration samples); refused where the machine
    has less available (unless ``cfg.memory_check`` is off)."""
    need = estimate_footprint(work.analysis, work.model.ByteSize(), sum(v.nbytes for v in data.samples.values()),
                              RUN_BATCH if work.batched else 1)
    free = available_bytes()
    log.info("memory: about %.1f GB at the peak estimated (%s); %s available", need.total / 2**30, need.describe(),
             "unknown" if free is None else f"{free / 2**30:.1f} GB")
    if cfg.memory_check and free is not None and need.total > free:
        raise ResourceError(
            f"compress would need about {need.total / 2**30:.1f} GB at its peak ({need.describe()}) and "
            f"{free / 2**30:.1f} GB are available: free memory, give fewer calibration samples or a smaller "
            "input size, or --skip-memory-check to try anyway")
    return need


def _sample_seconds(work: _Work, cfg: CompressConfig) -> float:
    """One sample's run through the model, timed on a batch as the probe runs them, after a warm-up run
    (one sample at a time where a batch does not run)."""
    sess = make_session(work.model, cfg.provider, cfg.threads)
    for n in dict.fromkeys((min(len(work.fit), RUN_BATCH) if work.batched else 1, 1)):
        feeds = work.fit.take(slice(0, n))
        try:
            sess.run(None, feeds)
        except Exception:  # noqa: BLE001 - a batch fixed inside the graph; onnxruntime raises several types
            continue
        started = time.perf_counter()
        sess.run(None, feeds)
        return (time.perf_counter() - started) / n
    raise UnsupportedModelError("onnxruntime cannot run the model on one calibration sample")


def _latency_model(work: _Work, cfg: CompressConfig) -> LatencyModel:
    table = latency_table(cfg.provider, cfg.threads)
    table.pin_reference(work.measured("latency_reference_seconds", table.reference))
    lat = LatencyModel(work.analysis, table, cfg.round_to, work.progress)

    def whole() -> float:
        runs = benchmark([work.model], cfg.provider, cfg.threads, runs=30, warmup=3, input_shapes=work.shapes,
                         seconds=TIMING_SECONDS)
        # a low percentile: other processes only ever add time, and the table holds quiet numbers
        return float(np.percentile(runs["models"][0]["latencies_ms"], 20)) / 1e3

    lat.calibrate(work.measured("model_seconds", whole))
    return lat


def _search_settings(cfg: CompressConfig, shapes: dict) -> dict[str, Any]:
    """What decides the plan besides the model and the samples (recovery's settings do not)."""
    skip = {"recover", "recover_seconds", "min_fidelity", "device", "ray_address", "ray_workers", "memory_check"}
    return {"shapes": shapes, **{k: v for k, v in vars(cfg).items() if k not in skip}}


def _budget(a: Analysis, lat: LatencyModel | None, cfg: CompressConfig) -> Budget:
    if cfg.latency is not None:
        return Budget("latency", cfg.latency, lat.seconds(), lat.seconds)
    return Budget("flops", cfg.flops, a.total_macs, a.macs)


def _measure(original: onnx.ModelProto, compressed: onnx.ModelProto, shapes: dict, cfg: CompressConfig,
             progress: Progress | None) -> dict[str, float]:
    """Interleaved latency of the original and the compressed model (what users compress for)."""
    if progress:
        progress("timing original vs compressed", 0, 1)
    b = benchmark([original, compressed], cfg.provider, cfg.threads, runs=40, warmup=3, input_shapes=shapes,
                  seconds=TIMING_SECONDS)
    if progress:
        progress("timing original vs compressed", 1, 1)
    before, after = (m["p50_ms"] for m in b["models"])
    return {"ms_before": round(before, 4), "ms_after": round(after, 4),
            "speedup": round(before / after, 4) if after > 0 else 0.0}


LOW_FIDELITY = 0.9   # held-out cosine below which the user is told the result is poor
# ... or relative L2 above what that cosine means at equal norms (√(2 − 2·0.9)): a cosine per
# sample says nothing of an output with one value per sample (a VAD's speech score)
HIGH_ERROR = 0.45


def _faithful_hint(cfg: CompressConfig, report: dict[str, Any]) -> str:
    """What the first step's measured curves say would stay faithful (the damage that, at equal
    norms, means a cosine of the asked-for fidelity: 2·(1 − cos))."""
    cosine = cfg.min_fidelity if cfg.min_fidelity is not None else LOW_FIDELITY
    curves = report["sensitivity"][0] if report["sensitivity"] else {}
    share = faithful_share(curves, 2 * (1 - cosine))
    what, flag = ("MACs", "flops") if cfg.flops is not None else ("latency", "latency")
    asked = cfg.removal
    if share >= asked:   # the curves are one unit at a time: here the units' damages compound
        return (f"The measured curves, one layer at a time, predicted --{flag} {asked} faithful: the layers' "
                f"damages compound on this model, so try a smaller --{flag}; more real calibration samples "
                "or fine-tuning (--finetune) would also help")
    return (f"The measured curves say about {share:.0%} less {what} keeps a cosine of {cosine} (--{flag} {share:.2f}); "
            "more real calibration samples or fine-tuning (--finetune) would also help")


def _judge_results(cfg: CompressConfig, report: dict[str, Any]) -> None:
    """Warn where the result is poor, saying what would stay faithful; refuse it under
    ``min_fidelity``."""
    t = report["totals"]
    f = report["fidelity"]
    hint = _faithful_hint(cfg, report)
    if cfg.min_fidelity is not None and f["cosine_mean"] < cfg.min_fidelity:
        raise FidelityError(f"held-back cosine {f['cosine_mean']:.3f} is below --min-fidelity {cfg.min_fidelity}; "
                            f"nothing written. {hint}")
    for out in f.get("outputs", [f]):
        if out["cosine_mean"] < LOW_FIDELITY or out["rel_l2"] > HIGH_ERROR:
            log.warning("held-out fidelity is low%s: cosine %.3f, relative error %.3f. %s",
                        f" on output {out['output']}" if "output" in out else "", out["cosine_mean"], out["rel_l2"], hint)
    if cfg.flops is not None and t["mac_reduction"] > cfg.flops + 0.01:
        log.warning("removed %.3f of the MACs for --flops %.3f: no plan on these channel widths lands nearer "
                    "without far more damage%s", t["mac_reduction"], cfg.flops,
                    " (--round-to 1 allows finer widths)" if cfg.round_to != 1 else "")
    elif cfg.flops is not None and t["mac_reduction"] < cfg.flops - 0.01:
        log.warning("achieved MAC reduction %.3f falls short of the target %.3f by more than 1 point",
                    t["mac_reduction"], cfg.flops)
    if cfg.latency is not None:
        achieved = 1 - 1 / t["latency"]["speedup"] if t["latency"]["speedup"] > 0 else 0.0
        if achieved < cfg.latency - 0.05:
            log.warning("measured latency reduction %.3f falls short of the target %.3f (predicted %.3f): "
                        "timing noise or a latency table measured under other load", achieved, cfg.latency,
                        t["latency"]["predicted_reduction"])


def _sample_split(fit: Calibration, cfg: CompressConfig, turn: int = 0, turns: int = 1) -> tuple[dict, dict]:
    """Samples to measure damage on and samples for the refits' statistics, disjoint when there
    are enough, so damage is measured on samples the refit did not see. Try ``turn`` of
    ``turns`` starts 1/turns of the way into the samples, so the tries' splits differ."""
    n = len(fit)
    k = min(cfg.sens_samples, n)
    order = np.roll(np.arange(n), -(turn * n // turns))
    if n - k >= 8:
        return fit.take(order[:k]), fit.take(order[k:k + cfg.stat_samples])
    if turn == 0:
        log.warning("only %d calibration samples: weight refits are measured on the samples they were "
                    "fitted to; give 40 or more for honest measurements", n)
    return fit.take(order[:k]), fit.take(order[:min(cfg.stat_samples, n)])


def _tagged(progress: Progress | None, turn: int, turns: int) -> Progress | None:
    """``progress`` with each message prefixed by the try it belongs to, when there are several."""
    if progress is None or turns == 1:
        return progress
    return lambda message, done, total: progress(f"try {turn + 1}/{turns}: {message}", done, total)


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

