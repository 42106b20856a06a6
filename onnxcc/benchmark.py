"""Compare the latency of several models fairly: shared warm-up, interleaved rounds, percentiles.

Machine noise (frequency scaling, other processes, page cache) drifts over seconds, so timing
model A fully and then model B biases the comparison. Here every round runs each model ``k`` times
in turn and the statistics are computed over all rounds, so drift hits every model alike.
Profiling happens in a separate pass because the profiler's bookkeeping inflates the timings.
"""
from __future__ import annotations

import bisect
import gc
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from .analysis.view import random_feeds, resolve_input_shapes
from .errors import InputShapeError, UsageError
from .io import load_model
from .runtime import _ort, make_session, providers_for

ModelArg = onnx.ModelProto | str | os.PathLike
RUNS = 50    # timed runs per model
BATCH = 1


def benchmark(models: list[ModelArg], provider: str = "cpu", threads: int = 0, batch: int = BATCH,
              runs: int = RUNS, warmup: int = 5,
              input_shapes: dict[str | None, tuple[int, ...]] | None = None,
              profile: bool = False, seed: int = 0, per_round: int = 5, top: int = 15,
              seconds: float | None = None) -> dict:
    """Time ``models`` interleaved in rounds of ``per_round`` runs each; ``runs`` per model in all,
    or fewer where the timed rounds pass ``seconds`` (whole rounds, at least one).

    Returns ``{"provider", "threads", "batch", "runs", "warmup", "per_round", "models": [...]}``;
    each model entry has p50/p90/mean/std/min in ms, ``n``, ``speedup`` (first model's p50 over
    this one's) and ``latencies_ms`` in run order; with ``profile`` also a ``profile`` dict.
    """
    if not models:
        raise UsageError("bench needs at least one model")
    if runs < 1 or per_round < 1 or warmup < 0 or batch < 1:
        raise UsageError("--runs and --batch must be >= 1 (and warm-up >= 0)")
    providers_for(provider)  # fail on a missing CUDA provider before loading anything
    protos = [m if isinstance(m, onnx.ModelProto) else load_model(m) for m in models]
    labels = _labels(models)
    feeds = _feeds(protos, input_shapes, batch, seed)
    sessions = [make_session(m, provider, threads) for m in protos]

    for label, sess, f in zip(labels, sessions, feeds):
        _warm(label, sess, f, warmup)
    times: list[list[float]] = [[] for _ in protos]
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one model's run would be charged to that model
    try:
        done, start = 0, time.perf_counter()
        while done < runs and (seconds is None or not done or time.perf_counter() - start < seconds):
            k = min(per_round, runs - done)
            for sess, f, t in zip(sessions, feeds, times):
                for _ in range(k):
                    t0 = time.perf_counter_ns()
                    sess.run(None, f)
                    t.append((time.perf_counter_ns() - t0) / 1e6)
            done += k
    finally:
        if gc_was_enabled:
            gc.enable()

    entries = [_stats(label, t) for label, t in zip(labels, times)]
    for e, f in zip(entries, feeds):
        e["input_shapes"] = {k: list(v.shape) for k, v in f.items()}
        e["speedup"] = round(entries[0]["p50_ms"] / e["p50_ms"], 4) if e["p50_ms"] > 0 else 0.0
    if profile:
        for e, m, f in zip(entries, protos, feeds):
            e["profile"] = profile_model(m, f, provider, threads, runs=min(runs, 20),
                                         warmup=warmup, top=top)
    return {"provider": provider, "threads": threads, "batch": batch, "runs": done,
            "warmup": warmup, "per_round": per_round, "onnxruntime": _ort().__version__,
            "models": entries}


def profile_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu",
                  threads: int = 2, runs: int = 10, warmup: int = 2, top: int = 15) -> dict:
    """Per-op-type and per-node kernel time (ms per run) from onnxruntime's profiler trace.

    Names and op types are those of the optimized graph onnxruntime runs (fused Conv, NCHWc
    Reorder nodes), since that is where the time goes.
    """
    with tempfile.TemporaryDirectory(prefix="onnxcc-prof-") as tmp:
        sess = make_session(model, provider, threads, profile_prefix=str(Path(tmp) / "onnxcc"))
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        events = read_trace(sess)
    return aggregate_trace(split_runs(events)[warmup:], top)


def read_trace(sess) -> list[dict]:
    """Stop the session's profiler and return its Chrome-trace events."""
    with open(sess.end_profiling()) as fh:
        return json.load(fh)


def split_runs(events: list[dict]) -> list[list[dict]]:
    """Kernel events grouped per ``run()`` call, in execution order.

    The profiler cannot be switched on after warm-up, so callers drop the first runs instead.
    """
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    kernels = sorted((e for e in events if e.get("cat") == "Node"
                      and e.get("name", "").endswith("_kernel_time")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in kernels]
    return [kernels[bisect.bisect_left(starts, t0):bisect.bisect_right(starts, t1)] for t0, t1 in runs]


def aggregate_trace(runs: list[list[dict]], top: int = 15) -> dict:
    """Average per-run kernel time (ms) by op type and by node, from :func:`split_runs` groups."""
    n_runs = max(1, len(runs))
    by_op: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_node: dict[str, list] = {}
    for e in (e for run in runs for e in run):
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        us = float(e.get("dur", 0))
        by_op[op][0] += us
        by_op[op][1] += 1
        by_node.setdefault(node, [op, 0.0])[1] += us
    total = sum(v[0] for v in by_op.values()) / n_runs / 1000
    ops = sorted(({"op_type": op, "ms": us / n_runs / 1000, "count": c // n_runs}
                  for op, (us, c) in by_op.items()), key=lambda d: -d["ms"])
    nodes = sorted(({"node": n, "op_type": op, "ms": us / n_runs / 1000}
                    for n, (op, us) in by_node.items()), key=lambda d: -d["ms"])[:top]
    for d in ops + nodes:
        d["pct"] = round(100 * d["ms"] / total, 2) if total else 0.0
        d["ms"] = round(d["ms"], 4)
    return {"runs": len(runs), "kernel_ms": round(total, 4), "by_op_type": ops, "top_nodes": nodes}




def _labels(models: list[ModelArg]) -> list[str]:
    """File names where they are unique, else full paths; graph names for in-memory models."""
    def name(m: ModelArg, full: bool) -> str:
        if isinstance(m, onnx.ModelProto):
            return m.graph.name or "model"
        return str(m) if full else Path(m).name

    labels = [name(m, False) for m in models]
    full = [name(m, True) for m in models]
    if len(set(full)) > len(set(labels)):
        labels = full
    # two in-memory models may still share a graph name (or a file be given twice)
    return [lab if labels[:i].count(lab) == 0 else f"{lab}#{labels[:i].count(lab) + 1}"
            for i, lab in enumerate(labels)]


def _feeds(protos: list[onnx.ModelProto], pinned: dict[str | None, tuple[int, ...]] | None, batch: int,
           seed: int) -> list[dict[str, np.ndarray]]:
    """Random inputs per model; models with the first model's input signature share its arrays,
    so a compressed model and its original see exactly the same data."""
    feeds: list[dict[str, np.ndarray]] = []
    for m in protos:
        f = random_feeds(m, resolve_input_shapes(m, pinned), seed=seed, batch=batch)
        if feeds and _signature(f) == _signature(feeds[0]):
            f = feeds[0]
        feeds.append(f)
    return feeds


def _signature(feeds: dict[str, np.ndarray]) -> list[tuple]:
    return sorted((k, v.shape, v.dtype.str) for k, v in feeds.items())


def _warm(label: str, sess, feeds: dict[str, np.ndarray], warmup: int) -> None:
    try:
        for _ in range(max(1, warmup)):
            sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise InputShapeError(f"{label}: onnxruntime cannot run at input shapes {shapes} "
                              f"(fixed batch? pin --input-shape): {str(e).splitlines()[0][:200]}") from None


def _stats(label: str, ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"name": label, "n": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "mean_ms": round(float(a.mean()), 4),
            "std_ms": round(float(a.std()), 4), "min_ms": round(float(a.min()), 4),
            "latencies_ms": [round(x, 4) for x in ms]}
