#!/usr/bin/env python
"""Measurement throughput on Ray: the same candidate jobs measured in this process, on 1 and on 2
single-threaded Ray workers of a local cluster.

    python tools/bench_ray.py [--model mobilenetv2] [--rounds 2]

Jobs are what a search step measures: one layer's weights changed (half its output channels
zeroed) and the network's outputs compared with the original's on 16 calibration samples, from
the first node the change reaches. Every configuration measures the same jobs, onnxruntime with one
thread per process; the damages must agree. Writes tools/results/ray.md. Needs
``python tools/fetch_data.py`` and ``pip install 'onnxcc[ray]'``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402

from onnxcc.inspect import inspect_model  # noqa: E402
from onnxcc.search import WeightProbe  # noqa: E402


def jobs(probe: WeightProbe, rounds: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rounds):
        for key, v in probe.views.items():
            w = probe.original[v.weight]
            mask = (rng.random(w.shape[0]) < 0.5).astype(w.dtype).reshape((-1,) + (1,) * (w.ndim - 1))
            out.append(({key}, lambda d={v.weight: w * mask}: d))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenetv2", choices=sorted(models.CORPUS))
    p.add_argument("--rounds", type=int, default=2, help="jobs per layer")
    args = p.parse_args()
    import ray

    name, shape = args.model, models.CORPUS[args.model][1]
    model_path = models.model_path(name)
    ins = inspect_model(str(model_path), {models.INFO[name]["input"]: shape})
    x = np.load(models.calib_path(name))[:16]
    probe = WeightProbe(ins.analysis, ins.model, {models.INFO[name]["input"]: x}, threads=1)
    todo = jobs(probe, args.rounds)
    rows = []

    def timed(label: str, workers: int | None) -> list[float]:
        if workers:
            probe.on_ray("auto", workers)
            probe.damages({}, todo[:2 * workers])   # the workers' sessions are built: not what is compared
        t0 = time.perf_counter()
        d = probe.damages({}, todo)
        seconds = time.perf_counter() - t0
        probe.close()
        rows.append((label, seconds, len(todo) / seconds))
        print(f"{label}: {len(todo)} jobs in {seconds:.1f} s ({len(todo) / seconds:.2f} jobs/s)", flush=True)
        return d

    here = timed("this process, 1 thread", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        one = timed("Ray, 1 worker", 1)
        two = timed("Ray, 2 workers", 2)
    finally:
        ray.shutdown()
    agree = max(np.max(np.abs(np.subtract(one, here))), np.max(np.abs(np.subtract(two, here))))
    ratio = rows[2][2] / rows[1][2]
    md = [f"# Measurement throughput on Ray ({name})", "",
          f"{len(todo)} candidate jobs (one layer's weights changed, damage on 16 calibration samples), "
          "onnxruntime with one thread per process; a local Ray cluster started with `ray.init(num_cpus=2)` "
          f"on this 2-core machine. Largest difference of a damage from the in-process one: {agree:.2e}.", "",
          "Command: `python tools/bench_ray.py`", "",
          "| where | seconds | jobs/s |", "|---|---|---|"]
    md += [f"| {label} | {s:.1f} | {r:.2f} |" for label, s, r in rows]
    md += ["", f"2 workers vs 1: **{ratio:.2f}×** the throughput."]
    out = REPO / "tools" / "results" / "ray.md"
    out.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
