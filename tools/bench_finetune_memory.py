#!/usr/bin/env python
"""Peak memory of ``onnxcc finetune`` against the size of the training set: it must not grow with it.

    python tools/bench_finetune_memory.py [--sizes 5000 40000] [--epochs 1] [--workers 1]

Teacher: ``models.shapes``' trained ``padres`` network (a ResNet on 32x32 textures, 4 classes),
exported to ONNX; student: that teacher compressed by ``onnxcc compress --flops 0.5``. Data: the
textures the network learns from, generated from a seed and written once per size as class
folders of 32x32 PNGs, and as one ``.npy`` (read memory-mapped); cached under
``<data dir>/finetune_memory/``. Each run is one ``onnxcc finetune`` process over the whole set
(every sample read once per epoch), measured from outside:

* peak PSS of the process and its DataLoader workers together, sampled every 50 ms from
  /proc/<pid>/smaps_rollup (PSS shares pages that forked workers have in common instead of
  counting them per process);
* max RSS of any one process of the run (``getrusage`` of a wrapper that runs only it).

Writes tools/results/finetune_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

import models  # noqa: E402

SIZE = 32
KINDS = ("image folder", ".npy (memory-mapped)")
SCALE = 64.0   # texture values (about -2..2) to PNG pixels: 128 + 64 * value


def textures_as_images(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(128 + SCALE * x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_sets(root: Path, n: int, seed: int = 0, chunk: int = 2000) -> tuple[Path, Path]:
    """``n`` textures as class folders of PNGs and as one .npy, written once."""
    from PIL import Image

    from models.shapes import textures

    folder, npy = root / f"images-{n}", root / f"x-{n}.npy"
    if not (folder / "done").is_file() or not npy.is_file():
        tmp = root / f"images-{n}.tmp"
        out = np.lib.format.open_memmap(root / f"x-{n}.npy.tmp", "w+", np.float32, (n, 3, SIZE, SIZE))
        for start in range(0, n, chunk):
            x, y = textures(min(chunk, n - start), seed + start)
            px = textures_as_images(x)
            out[start:start + len(x)] = (px.transpose(0, 3, 1, 2).astype(np.float32) - 128) / SCALE
            for k, (im, label) in enumerate(zip(px, y)):
                d = tmp / f"{label}"
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(d / f"{start + k:06d}.png")
        out.flush()
        del out
        os.replace(root / f"x-{n}.npy.tmp", npy)
        (tmp / "done").write_text("")
        tmp.rename(folder)
        print(f"wrote {n} images to {folder} and {npy}", flush=True)
    return folder, npy


def models_for(root: Path) -> tuple[Path, Path]:
    """The trained teacher and its compressed student (made once)."""
    import onnx

    from models import shapes
    from onnxcc import save_model
    from onnxcc.calib import Calibration
    from onnxcc.compression import compress

    teacher, student = root / "padres.onnx", root / "padres.cc50.onnx"
    if not student.is_file():
        model = shapes.to_onnx(shapes.train("padres"), "padres")
        save_model(model, teacher)
        calib, _ = shapes.data("padres", 64, 100)
        cut = compress(model, 0.5, calib=Calibration(calib, "64 textures"), recover="none").model
        save_model(cut, student)
        onnx.checker.check_model(str(student), full_check=True)
    return teacher, student


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def measured(cmd: list[str]) -> dict:
    """Run ``cmd`` under a wrapper that reports its max RSS; sample the tree's PSS meanwhile."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(pss_kb(p) for p in tree(proc.pid) if p != proc.pid))
            time.sleep(0.05)
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    maxrss = int(next(l.split()[1] for l in err.splitlines() if l.startswith("MAXRSS")))
    return {"peak_pss_mb": round(peak[0] / 1024, 1), "max_rss_mb": round(maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - t0, 1), "last_line": out.strip().splitlines()[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 40000])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for the image folders")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="which data forms to measure (rows of the others are kept from the last results)")
    args = p.parse_args()
    root = models.data_dir() / "finetune_memory"
    root.mkdir(parents=True, exist_ok=True)
    teacher, student = models_for(root)
    rows = []
    for n in args.sizes:
        folder, npy = write_sets(root, n)
        images = ["--workers", str(args.workers), "--image-size", str(SIZE), str(SIZE), "--center-crop", "1",
                  "--mean", *[str(128 / 255)] * 3, "--std", *[str(SCALE / 255)] * 3]
        for kind, data, extra in (("image folder", folder, images), (".npy (memory-mapped)", npy, [])):
            if kind not in args.kinds:
                continue
            out = root / f"tuned-{n}.onnx"
            cmd = [sys.executable, "-m", "onnxcc", "finetune", str(student), "--teacher", str(teacher),
                   "--data", str(data), "-o", str(out), "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--device", "cpu", *extra]
            r = {"data": kind, "samples": n, **measured(cmd)}
            print(r, flush=True)
            rows.append(r)
            out.unlink(missing_ok=True)
    results = REPO / "tools" / "results"
    if (results / "finetune_memory.json").is_file():   # rows of the forms not measured now
        kept = json.loads((results / "finetune_memory.json").read_text())["rows"]
        rows = [r for r in kept if r["data"] not in args.kinds] + rows
    by = {(r["data"], r["samples"]): r for r in rows}
    small, large = min(args.sizes), max(args.sizes)
    growth = {kind: {m: round(by[(kind, large)][m] / by[(kind, small)][m] - 1, 3) for m in ("peak_pss_mb", "max_rss_mb")}
              for kind in ("image folder", ".npy (memory-mapped)")}
    res = {"rows": rows, "growth_from_smallest_to_largest": growth, "epochs": args.epochs,
           "batch_size": args.batch_size, "workers": args.workers,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    (results / "finetune_memory.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["# Peak memory of `onnxcc finetune` against the training set's size", "",
          f"Student: the `padres` shape (trained ResNet, 32x32 textures) compressed to 50% of its MACs; teacher: the "
          f"original. {args.epochs} epoch(s) over every sample, batch {args.batch_size}, CPU; image folders read by "
          f"{args.workers} DataLoader worker(s). Command: `python tools/bench_finetune_memory.py`.", "",
          "| data | samples | peak PSS, process + workers (MB) | max RSS of one process (MB) | wall (s) |",
          "|---|---|---|---|---|"]
    md += [f"| {r['data']} | {r['samples']} | {r['peak_pss_mb']} | {r['max_rss_mb']} | {r['seconds']} |" for r in rows]
    md += ["", f"Growth from {small} to {large} samples: " + "; ".join(
        f"{kind}: peak PSS {g['peak_pss_mb']:+.1%}, max RSS {g['max_rss_mb']:+.1%}" for kind, g in growth.items()) + "."]
    (results / "finetune_memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
