"""Measure Conv latency against channel count on this machine, to see which multiples are fast.

    python tools/bench_widths.py [--lo 64 --hi 128 --step 1 --threads 2 --budget 0.3]

Times Cin = Cout = c for every c in [lo, hi] for a 3x3 and a 1x1 Conv at 28x28 and 56x56
(interleaved per shape, median of the runs, see onnxcc.latency.measure_chains) and writes
tools/results/widths.json, widths.md and widths.png. onnxruntime's CPU Conv works on NCHWc
blocks (8 channels with AVX2, 16 with AVX-512), so latency should be a staircase with steps at
those multiples and throughput (GMAC/s) should peak on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcc.latency import ConvSpec, chain_macs, machine_info, measure_chains  # noqa: E402

SHAPES = ((3, 28), (1, 28), (3, 56), (1, 56))  # (kernel, hw)
CLASSES = (32, 16, 8, 4, 2, 1)


def largest_multiple(c: int) -> int:
    return next(m for m in CLASSES if c % m == 0)


def measure(counts: list[int], threads: int, budget: float) -> dict[str, dict[int, float]]:
    out = {}
    for k, hw in SHAPES:
        t0 = time.time()
        chains = [(hw, (ConvSpec(c, c, k),)) for c in counts]
        out[f"{k}x{k}@{hw}"] = dict(zip(counts, measure_chains(chains, "cpu", threads, budget)))
        print(f"{k}x{k} at {hw}x{hw}: {len(counts)} widths in {time.time() - t0:.1f}s", flush=True)
    return out


def gmacs(shape: str, c: int, seconds: float) -> float:
    k, hw = int(shape.split("x")[0]), int(shape.split("@")[1])
    return chain_macs((hw, (ConvSpec(c, c, k),))) / seconds / 1e9


def summary(results: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Median GMAC/s per shape over the widths whose largest power-of-two divisor is m."""
    table = {}
    for shape, lat in results.items():
        by = {m: [gmacs(shape, c, t) for c, t in lat.items() if largest_multiple(c) == m] for m in CLASSES}
        table[shape] = {m: round(float(np.median(v)), 2) for m, v in by.items() if v}
    return table


def block_size(machine: dict) -> int:
    """onnxruntime's NCHWc block: 16 channels with AVX-512, 8 with AVX2."""
    return 16 if "avx512f" in machine.get("isa", []) else 8


def round_up(results: dict[str, dict[int, float]], block: int) -> dict[str, dict[str, float]]:
    """Median latency of c relative to the next multiple of ``block`` (< 1: c is cheaper)."""
    table = {}
    for shape, lat in results.items():
        groups: dict[str, list[float]] = {"multiple of 4": [], "not a multiple of 4": []}
        for c, t in lat.items():
            up = -(-c // block) * block
            if c % block and up in lat:
                groups["multiple of 4" if c % 4 == 0 else "not a multiple of 4"].append(t / lat[up])
        table[shape] = {g: round(float(np.median(v)), 3) for g, v in groups.items() if v}
    return table


def write_markdown(path: Path, results, summ, meta) -> None:
    shapes = list(results)
    lines = [f"# Conv latency vs channel count (Cin = Cout = c), {meta['threads']} threads",
             "", f"CPU: {meta['machine'].get('cpu')}, ISA: {' '.join(meta['machine'].get('isa', []))}, "
             f"onnxruntime {meta['machine']['onnxruntime']}. Each Conv timed inside a network "
             f"(between two 1x1 Convs, NCHWc Reorders it forces included), interleaved over 5 rounds "
             f"(onnxcc.latency.measure_chains); {meta['seconds']} s in all.", "",
             "## Median throughput (GMAC/s) by largest power-of-two divisor of c", "",
             "| shape | " + " | ".join(f"x{m}" for m in CLASSES) + " |",
             "|---|" + "---:|" * len(CLASSES)]
    for s in shapes:
        lines.append(f"| {s} | " + " | ".join(str(summ[s].get(m, "-")) for m in CLASSES) + " |")
    block = block_size(meta["machine"])
    up = round_up(results, block)
    groups = ["multiple of 4", "not a multiple of 4"]
    lines += ["", f"## Latency relative to the next multiple of {block} (median; > 1: rounding up is faster)",
              "", "| shape | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for s in shapes:
        lines.append(f"| {s} | " + " | ".join(str(up[s].get(g, "-")) for g in groups) + " |")
    lines += ["", "## Latency (ms) and throughput (GMAC/s) per width", "",
              "| c | mult | " + " | ".join(f"{s} ms | {s} GMAC/s" for s in shapes) + " |",
              "|---:|---:|" + "---:|---:|" * len(shapes)]
    for c in results[shapes[0]]:
        cells = [f"{results[s][c] * 1e3:.3f} | {gmacs(s, c, results[s][c]):.1f}" for s in shapes]
        lines.append(f"| {c} | {largest_multiple(c)} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results, threads: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {16: "tab:red", 8: "tab:orange", 4: "tab:blue", 1: "tab:gray"}
    labels = {16: "multiple of 16", 8: "multiple of 8", 4: "multiple of 4", 1: "other"}
    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), sharex=True)
    for col, (shape, lat) in enumerate(results.items()):
        cs = np.array(list(lat))
        ms = np.array([lat[c] * 1e3 for c in cs])
        gm = np.array([gmacs(shape, c, lat[c]) for c in cs])
        for row, ys, ylabel in ((0, ms, "latency (ms)"), (1, gm, "throughput (GMAC/s)")):
            ax = axes[row, col]
            ax.plot(cs, ys, color="lightgray", lw=1, zorder=1)
            for m in (16, 8, 4, 1):
                sel = np.array([next(x for x in (16, 8, 4, 1) if c % x == 0) == m for c in cs])
                ax.scatter(cs[sel], ys[sel], s=18 if m >= 8 else 10, color=colors[m], label=labels[m], zorder=2)
            for c in range(int(cs.min()) // 16 * 16, int(cs.max()) + 1, 16):
                ax.axvline(c, color="tab:red", lw=0.5, alpha=0.3)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"Conv {shape} (Cin = Cout = c), {threads} threads")
            else:
                ax.set_xlabel("channels c")
    axes[0, 0].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lo", type=int, default=64)
    ap.add_argument("--hi", type=int, default=128)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of timed runs per width")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "results")
    ap.add_argument("--replot", action="store_true", help="redraw widths.md/png from widths.json")
    args = ap.parse_args()

    if args.replot:
        doc = json.loads((args.out / "widths.json").read_text())
        meta = {k: doc[k] for k in ("threads", "budget_s", "machine", "seconds")}
        results = {s: {int(c): t for c, t in lat.items()} for s, lat in doc["latency_s"].items()}
        summ = summary(results)
    else:
        counts = list(range(args.lo, args.hi + 1, args.step))
        t0 = time.time()
        results = measure(counts, args.threads, args.budget)
        summ = summary(results)
        meta = {"threads": args.threads, "budget_s": args.budget, "machine": machine_info("cpu"),
                "seconds": round(time.time() - t0, 1)}
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {**meta, "latency_s": {s: {str(c): t for c, t in lat.items()} for s, lat in results.items()},
               "median_gmacs_by_multiple": summ}
        (args.out / "widths.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(args.out / "widths.md", results, summ, meta)
    plot(args.out / "widths.png", results, args.threads)
    print(json.dumps({"median_gmacs_by_multiple": summ,
                      "relative_to_next_block": round_up(results, block_size(meta["machine"]))}, indent=1))
    print(f"results in {args.out}/ (the measurement took {meta['seconds']} s)")


if __name__ == "__main__":
    main()
