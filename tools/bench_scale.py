#!/usr/bin/env python
"""Compress time, peak memory and fidelity from ~0.3 to 16 GMACs (issue 20).

    python tools/bench_scale.py --label after [--models ...] [--flops 0.3] [--timeout 1800]
    python tools/bench_scale.py --label before --onnxcc /path/to/older/checkout ...

Each model is compressed by ``onnxcc compress MODEL --flops F --calib X.npy --recover none`` in a
child process under ``/usr/bin/time -v`` (peak RSS of the whole run), with 64 calibration
samples: photos at the model's input size (compress holds a quarter back for the held-out
cosine it reports). Recovery is left out: its time is its own budget (``--recover-time``), and
this measures the search. A run past ``--timeout`` is killed; its row keeps the time estimate
compress printed before measuring. Rows are merged into tools/results/scale.json under
``--label``; tools/results/scale.md puts the labels side by side. Needs
``python tools/fetch_data.py`` (the YOLOv8-seg-size models are exported here on first use).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402
import photos  # noqa: E402

RESULTS = REPO / "tools" / "results"
SAMPLES = 64
# YOLOv8-seg-size networks: name -> (width, depth, input size)
SCALED = {"yolov8n_seg_576": (0.25, 0.33, 576), "yolov8s_seg_576": (0.5, 0.33, 576)}
DEFAULT_MODELS = ["mobilenetv2", "efficientnet_lite0", "open_nsfw", "yolov8n_seg_576", "yolov8s_seg_576"]


def model_file(name: str) -> tuple[Path, tuple[int, ...], str]:
    """The ONNX file, its input shape (batch 1) and layout; YOLOv8-seg sizes are exported once."""
    if name in models.CORPUS:
        return models.model_path(name), models.CORPUS[name][1], models.INFO[name]["layout"]
    width, depth, size = SCALED[name]
    path = models.data_dir() / "models" / f"{name}.onnx"
    if not path.exists():
        from models import common, yolov8_seg
        net = yolov8_seg.build(img_size=size, width=width, depth=depth)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            common.export(net, Path(tmp) / "m.onnx", (1, 3, size, size), 13, output_names=("output", "protos"),
                          dynamic_batch=True, keep_bn=True)
            os.replace(Path(tmp) / "m.onnx", path)
    return path, (1, 3, size, size), "NCHW"


def calibration(name: str, shape: tuple[int, ...], layout: str, folder: Path) -> Path:
    """The first SAMPLES classification photos, at the model's size and in its preprocessing."""
    size = shape[2] if layout == "NCHW" else shape[1]
    kind = models.INFO.get(name, {}).get("preprocess", "imagenet")
    if kind == "open_nsfw":
        x = photos.load_photos_open_nsfw(models.data_dir() / "photos")
    elif kind == "efficientnet_lite":
        x = photos.load_photos_efficientnet_lite(models.data_dir() / "photos")
    else:
        x = photos.load_photos(models.data_dir() / "photos", size=size, layout=layout)
    x = x[:SAMPLES]
    if len(x) < SAMPLES:
        raise SystemExit(f"{name}: only {len(x)} photos")
    path = folder / f"{name}.npy"
    np.save(path, x.astype(np.float32))
    return path


def _macs(path: Path, shape: tuple[int, ...]) -> int:
    import onnx

    from onnxcc.inspect import inspect_model
    m = onnx.load(str(path))
    return inspect_model(m, {m.graph.input[0].name: shape}).analysis.total_macs


def run(name: str, flops: float, timeout: float, onnxcc: Path, extra: list[str]) -> dict:
    path, shape, layout = model_file(name)
    with tempfile.TemporaryDirectory(prefix="onnxcc-scale-") as tmp:
        calib = calibration(name, shape, layout, Path(tmp))
        out = Path(tmp) / "out.onnx"
        cmd = ["/usr/bin/time", "-v", "timeout", "-s", "KILL", str(int(timeout)), sys.executable, "-m", "onnxcc",
               "compress", str(path), "--flops", str(flops), "--calib", str(calib), "--recover", "none", "-o", str(out), *extra]
        env = {**os.environ, "PYTHONPATH": str(onnxcc)}
        t0 = time.perf_counter()
        # from the checkout itself: `python -m` puts the working directory first on the path
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=onnxcc)
        wall = time.perf_counter() - t0
        text = proc.stdout + proc.stderr
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        est = re.search(r"search: ~(\d+) (s|min) of measuring estimated", text)
        row = {"model": name, "gmacs": round(_macs(path, shape) / 1e9, 2), "flops": flops, "seconds": round(wall, 1),
               "peak_rss_gb": round(int(rss.group(1)) / 2**20, 2) if rss else None,
               "estimate_seconds": (int(est.group(1)) * (60 if est.group(2) == "min" else 1)) if est else None,
               "finished": out.exists()}
        report = out.with_name(out.name + ".report") / "report.json"
        if report.exists():
            r = json.loads(report.read_text())
            t = r["totals"]
            outs = r["fidelity"].get("outputs", [r["fidelity"]])   # the worst output speaks for the model
            row.update(mac_reduction=t["mac_reduction"],
                       cosine=round(min(o["cosine_mean"] for o in outs), 4),
                       rel_l2=round(max(o["rel_l2"] for o in outs), 4),
                       held_out=r["fidelity"]["samples"], sens_samples=r["config"].get("sens_samples"),
                       steps=r["config"].get("steps"), tries=r["search"].get("tries"),
                       first_search_seconds=r["search"].get("first_search_seconds"),
                       memory_estimated_gb=r.get("memory", {}).get("estimated_gb"))
        else:
            row["error"] = ("killed after the timeout" if proc.returncode in (137, -9) or "status 9" in text
                            else text.strip().splitlines()[-1][:300] if text.strip() else f"exit {proc.returncode}")
        return row


def render(results: dict) -> str:
    labels = list(results["labels"])
    names = list(dict.fromkeys(r["model"] for lab in labels for r in results["labels"][lab]["rows"]))
    lines = ["# Compress time and memory from 0.3 to 16 GMACs", "",
             f"`onnxcc compress MODEL --flops F --calib <{SAMPLES} photos> --recover none` in a child process under "
             "`/usr/bin/time -v`; seconds are its wall time, peak RSS its maximum resident set. Fidelity: the held-out "
             "cosine and relative L2 error compress reports (a quarter of the samples, never measured on), of the "
             "model's worst output. Steps × samples: what the search measured with. YOLOv8-seg-size networks "
             "from `models/yolov8_seg.py` (n: width 0.25, s: width 0.5; 576×576, two outputs): random weights, "
             "Kaiming-normal with BN statistics from image-like noise, so their outputs depend on the input "
             "(rows measured on the earlier default-init export, whose outputs did not, carry no fidelity).", ""]
    for lab in labels:
        meta = results["labels"][lab]
        lines.append(f"- **{lab}**: {meta['note']} (`{meta['command']}`)")
    lines += ["", "| model | GMACs | " + " | ".join(f"{lab}: seconds | {lab}: peak RSS | {lab}: cosine, rel. error | "
                                                f"{lab}: steps × samples" for lab in labels)
              + " |", "|---|---|" + "---|---|---|---|" * len(labels)]
    for name in names:
        cells, gmacs = [], ""
        for lab in labels:
            row = next((r for r in results["labels"][lab]["rows"] if r["model"] == name), None)
            if row is None:
                cells += ["", "", "", ""]
                continue
            gmacs = gmacs or row["gmacs"]
            secs = f"{row['seconds']:.0f}" if row["finished"] else (
                f"stopped at {row['seconds']:.0f}; {row['estimate_seconds']} s of measuring estimated" if row.get("estimate_seconds")
                else f"failed: {row.get('error', '')}")
            est = f" ({row['memory_estimated_gb']} GB estimated)" if row.get("memory_estimated_gb") else ""
            cells += [secs, f"{row['peak_rss_gb']} GB{est}" if row["finished"] and row["peak_rss_gb"] else "",
                      f"{row['cosine']}, {row['rel_l2']}" if "rel_l2" in row else "",
                      f"{row['steps']} × {row['sens_samples']}" if row.get("sens_samples") else ""]
        lines.append(f"| {name} | {gmacs} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--note", default="")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--flops", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--onnxcc", type=Path, default=REPO, help="checkout whose onnxcc runs (default: this one)")
    p.add_argument("--compress-args", default="", help="more compress flags, e.g. '--search-time 100000'")
    args = p.parse_args()
    store = RESULTS / "scale.json"
    results = json.loads(store.read_text()) if store.exists() else {"labels": {}}
    rows = []
    for name in args.models:
        row = run(name, args.flops, args.timeout, args.onnxcc, args.compress_args.split())
        print(json.dumps(row), flush=True)
        rows.append(row)
    # a label measured again keeps its rows of models not measured this time
    kept = [r for r in results["labels"].get(args.label, {}).get("rows", []) if r["model"] not in args.models]
    order = {name: i for i, name in enumerate(DEFAULT_MODELS)}
    rows = sorted(kept + rows, key=lambda r: order.get(r["model"], len(order)))
    results["labels"][args.label] = {"note": args.note, "command": "python tools/bench_scale.py " + " ".join(sys.argv[1:]),
                                     "rows": rows}
    store.write_text(json.dumps(results, indent=1))
    (RESULTS / "scale.md").write_text(render(results))
    print((RESULTS / "scale.md").read_text())


if __name__ == "__main__":
    main()
