#!/usr/bin/env python
"""Benchmark onnxcc compress on real ImageNet classifiers without fine-tuning.

    python tools/bench_compress.py --recovery [--case mobilenetv2:0.5]   # post-training recovery, stage by stage
    python tools/bench_compress.py [--flops 0.3] [--steps 3] [--curve 0.1 0.2]   # the search's ablations

``--recovery``: MobileNetV2 at --flops 0.3 and 0.5 and EfficientNet-Lite0 at 0.3, each compressed
with the default recovery; a row per stage (least-squares refit only, + statistics correction,
+ block reconstruction, + end-to-end distillation). Calibration: the 50 classification photos of
the ai-benchmark wheel not used for evaluation and its 100 street photos (150, shuffled; compress
holds a quarter back, recovery trains on the rest); evaluation: the other 50 classification
photos, never seen. Agreement on the 150 calibration photos stands beside it (the overfitting
check). Writes tools/results/compress_recovery.{json,md}.

The ablations (no recovery, to compare the searches):
Calibrates on the first 50 of the ai-benchmark wheel's 100 real photos and evaluates on the other
50 (never seen by the compressor): top-1 agreement with the original, top-1-in-top-5, logit cosine,
MAC reduction (counted from onnxruntime's runtime shapes, independently of onnxcc's cost model)
and latency ratio (onnxruntime CPU, 2 threads, batch 1, interleaved rounds). Rows: --method cc /
prune / decompose, and cc without weight reconstruction (the paper's plain removal); then cc at
smaller targets (``--curve``), the trade-off a user picks a target from, plotted with the
--flops row. Writes tools/results/compress_mobilenetv2.{json,md,png}. Needs
`python tools/fetch_data.py` first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402
import photos  # noqa: E402
from photos import load_photos  # noqa: E402

from onnxcc.compression import compress  # noqa: E402


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]).astype(np.float64)


def runtime_macs(model: onnx.ModelProto, x: np.ndarray) -> int:
    """Conv/Gemm/MatMul MACs from the shapes onnxruntime produces (no onnxcc code involved)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    ops = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    want = [t for n in ops for t in (n.input[0], n.output[0]) if t not in inits]
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(want) if t not in have)
    s = session(m)
    vals = dict(zip([o.name for o in s.get_outputs()], s.run(None, {s.get_inputs()[0].name: x[:1]})))
    total = 0
    for n in ops:
        w, y = inits[n.input[1]], vals[n.output[0]].shape
        total += int(np.prod(w)) * (int(np.prod(y[2:])) if n.op_type == "Conv" else int(np.prod(y[:-1])))
    return total


def fidelity(ref: np.ndarray, out: np.ndarray) -> dict:
    """Top-1 agreement and mean logit cosine of ``out`` against the original's ``ref``."""
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1) + 1e-30)
    return {"top1_agreement": round(float((ref.argmax(1) == out.argmax(1)).mean()), 3),
            "cosine_mean": round(float(cos.mean()), 4)}


def latency_ratio(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray, rounds: int = 20, per: int = 10) -> float:
    sa, sb = session(a), session(b)
    feed = {sa.get_inputs()[0].name: x[:1]}
    ta, tb = [], []
    for s in (sa, sb, sa, sb):
        s.run(None, feed)
    for _ in range(rounds):
        for s, ts in ((sa, ta), (sb, tb)):
            for _ in range(per):
                t0 = time.perf_counter()
                s.run(None, feed)
                ts.append(time.perf_counter() - t0)
    return float(np.median(ta) / np.median(tb))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--flops", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--curve", type=float, nargs="*", default=[0.1, 0.2], help="smaller cc targets to plot")
    p.add_argument("--recovery", action="store_true", help="the recovery table instead of the ablations")
    p.add_argument("--case", action="append", metavar="MODEL:FLOPS",
                   help="with --recovery: measure only these cases again, keeping the table's other rows")
    args = p.parse_args()
    if args.recovery:
        cases = [(c.split(":")[0], float(c.split(":")[1])) for c in args.case] if args.case else RECOVERY_CASES
        return recovery_table(cases)
    photos = load_photos(models.data_dir() / "photos")
    calib, held = photos[:50], photos[50:]
    orig = onnx.load(str(models.model_path("mobilenetv2")))
    ref = logits(orig, held)
    macs0 = runtime_macs(orig, held)

    def row(label: str, flops: float, **kw) -> dict:
        t0 = time.perf_counter()
        res = compress(orig, flops, calib=_calibration(orig, calib), steps=args.steps, recover="none", **kw)
        secs = time.perf_counter() - t0
        out = logits(res.model, held)
        top5 = np.argsort(-out, 1)[:, :5]
        r = {
            "method": label, "flops": flops, "seconds": round(secs, 1),
            "mac_reduction": round(1 - runtime_macs(res.model, held) / macs0, 4),
            **fidelity(ref, out),
            "top1_in_top5": round(float(np.mean([ref[i].argmax() in top5[i] for i in range(len(ref))])), 3),
            "speedup": round(latency_ratio(orig, res.model, held), 3),
        }
        print(json.dumps(r), flush=True)
        return r

    rows = [row(label, args.flops, **kw) for label, kw in (
        ("cc", dict(method="cc")), ("prune", dict(method="prune")), ("decompose", dict(method="decompose")),
        ("cc, no reconstruction", dict(method="cc", reconstruct=False)))]
    curve = sorted([row("cc", f) for f in set(args.curve) - {args.flops}] + [rows[0]], key=lambda r: r["flops"])
    result = {"model": "mobilenetv2 (ImageNet weights)", "flops": args.flops, "steps": args.steps,
              "calibration": "50 real photos", "evaluation": "50 other real photos",
              "machine": f"{platform.processor() or platform.machine()}, {platform.node()}", "rows": rows,
              "curve": curve}
    out_dir = REPO / "tools" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "compress_mobilenetv2.json").write_text(json.dumps(result, indent=1))
    md = [f"# MobileNetV2, --flops {args.flops}, no fine-tuning", "",
          "Calibrated on 50 real photos, evaluated on 50 others. Latency: onnxruntime CPU, 2 threads, "
          "batch 1, interleaved (ratio of medians).", "",
          "| method | MACs removed | top-1 agreement | top-1 in top-5 | logit cosine | speedup | time (s) |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['mac_reduction']:.1%} | {r['top1_agreement']:.0%} | {r['top1_in_top5']:.0%} | "
           f"{r['cosine_mean']} | {r['speedup']}× | {r['seconds']} |" for r in rows]
    md += ["", "## cc at other targets", "", "![trade-off](compress_mobilenetv2.png)", "",
           "| --flops | MACs removed | top-1 agreement | top-1 in top-5 | logit cosine | speedup |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['flops']} | {r['mac_reduction']:.1%} | {r['top1_agreement']:.0%} | {r['top1_in_top5']:.0%} | "
           f"{r['cosine_mean']} | {r['speedup']}× |" for r in curve]
    (out_dir / "compress_mobilenetv2.md").write_text("\n".join(md) + "\n")
    plot_curve(curve, out_dir / "compress_mobilenetv2.png")


RECOVERY_CASES = (("mobilenetv2", 0.3), ("mobilenetv2", 0.5), ("efficientnet_lite0", 0.3))


def recovery_case(name: str) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """The original, its 150 calibration photos (shuffled) and its 50 evaluation photos."""
    calib, held = photos.load_calib_eval(models.data_dir(), preprocess=models.INFO[name]["preprocess"])
    return onnx.load(str(models.model_path(name))), calib[np.random.default_rng(0).permutation(len(calib))], held


def recovery_table(cases=RECOVERY_CASES) -> None:
    out_dir = REPO / "tools" / "results"
    rows = []
    for name, flops in cases:
        orig, calib, held = recovery_case(name)
        ref, ref_calib = logits(orig, held), logits(orig, calib)
        t0 = time.perf_counter()
        res = compress(orig, flops, calib=_calibration(orig, calib))
        secs = time.perf_counter() - t0
        rec = res.report["recovery"]
        for stage, model in res.stages.items():
            calib_agree = fidelity(ref_calib, logits(model, calib))["top1_agreement"]
            r = {"model": name, "flops": flops, "stage": stage, **fidelity(ref, logits(model, held)),
                 "calib_top1_agreement": calib_agree, "kept": stage == rec["kept"],
                 "stop_damage": round(rec["damage"][stage], 5), "choice_damage": round(rec["choice_damage"][stage], 5)}
            if stage == rec["kept"]:
                r.update(mac_reduction=round(1 - runtime_macs(model, held) / runtime_macs(orig, held), 4),
                         speedup=round(latency_ratio(orig, model, held), 3), compress_seconds=round(secs, 1),
                         recovery_seconds=rec["seconds"])
            rows.append(r)
            print(json.dumps(r), flush=True)
    if set(cases) != set(RECOVERY_CASES):   # the other cases' rows as last measured, in the table's order
        old = json.loads((out_dir / "compress_recovery.json").read_text())["rows"]
        rows = [r for r in old if (r["model"], r["flops"]) not in cases] + rows
        order = {c: i for i, c in enumerate(RECOVERY_CASES)}
        rows.sort(key=lambda r: order.get((r["model"], r["flops"]), len(order)))
    result = {"calibration": "150 photos (50 classification + 100 street, ai-benchmark 0.1.2), shuffled; "
                             "compress holds 38 back, recovery trains on 98 and stops on 14; the 38 choose the stage written",
              "evaluation": "the other 50 classification photos", "machine": _machine(), "rows": rows}
    (out_dir / "compress_recovery.json").write_text(json.dumps(result, indent=1))
    md = ["# Post-training recovery (no labels, no fine-tuning)", "",
          f"Calibration: {result['calibration']}. Evaluation: {result['evaluation']}, never seen. "
          f"Machine: {result['machine']}; onnxruntime CPU, 2 threads, batch 1 for the speedup. "
          "Each stage starts from the best before it on the 14 stopping samples; the stage written "
          "(**bold**) does least damage on compress's 38 held-back samples, which neither training nor "
          "early stopping saw.", "",
          "| model | --flops | after | top-1 agreement (50 unseen) | logit cosine | top-1 agreement (150 calibration) | "
          "damage on the 14 stopping samples | on the 38 held back |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = "**" if r["kept"] else ""
        md.append(f"| {r['model']} | {r['flops']} | {b}{r['stage']}{b} | {r['top1_agreement']:.0%} | "
                  f"{r['cosine_mean']} | {r['calib_top1_agreement']:.0%} | {r['stop_damage']} | "
                  f"{r.get('choice_damage', '-')} |")
    md += ["", "| model | --flops | MACs removed | speedup | compress time (s) | of which recovery (s) |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['flops']} | {r['mac_reduction']:.1%} | {r['speedup']}× | {r['compress_seconds']} | "
           f"{r['recovery_seconds']} |" for r in rows if r["kept"]]
    (out_dir / "compress_recovery.md").write_text("\n".join(md) + "\n")


def cpu_model() -> tuple[str, str]:
    """The CPU's model name and its flags line from /proc/cpuinfo (elsewhere: the platform's
    processor, no flags)."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(l.split(":", 1)[1].strip() for l in info if l.startswith("model name"))
        flags = next(l for l in info if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return cpu, flags


def _machine() -> str:
    """The CPU, its cores and its widest vector unit: the same run takes about twice as long
    without AVX-512, so timings are compared within one machine only."""
    cpu, flags = cpu_model()
    vector = "AVX-512" if " avx512f" in flags else "AVX2 only (no AVX-512)" if " avx2" in flags else ""
    return ", ".join(x for x in (cpu, f"{os.cpu_count()} cores", vector) if x)


def plot_curve(curve: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["mac_reduction"] for r in curve]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for key, label in (("top1_agreement", "top-1 agreement"), ("top1_in_top5", "top-1 in top-5"),
                       ("cosine_mean", "logit cosine")):
        ax.plot(x, [r[key] for r in curve], marker="o", label=label)
    ax.set_xlabel("MACs removed (%)")
    ax.set_ylim(0, 1.02)
    ax.set_title("MobileNetV2, onnxcc cc, no fine-tuning (50 held-out photos)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _calibration(model: onnx.ModelProto, x: np.ndarray):
    from onnxcc.calib import Calibration
    from onnxcc.analysis.view import graph_inputs

    return Calibration({graph_inputs(model)[0].name: x}, f"{len(x)} real photos")


if __name__ == "__main__":
    main()
