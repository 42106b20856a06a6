#!/usr/bin/env python
"""Time of one training step of the ONNX->torch executor, weights in the default layout against
channels-last (what recovery trains on), interleaved in one run.

    python tools/bench_train_step.py [--models mobilenetv2 efficientnet_lite0 open_nsfw] [--batch 16] [--rounds 7]

A step is what block reconstruction and distillation repeat: the model's outputs on a batch,
a squared loss, its backward pass. Each round times every layout once (after one untimed warm-up
step each), so a load that comes and goes falls on both alike; the table gives medians. Outputs
of the two layouts are compared on the batch (they must agree). Writes
tools/results/train_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402
from bench_compress import _machine  # noqa: E402

from onnxcc.finetuning.executor import OnnxModule  # noqa: E402

RESULTS = REPO / "tools" / "results"


def _step(module: OnnxModule, feeds: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    t0 = time.perf_counter()
    outs = module(feeds)
    loss = sum(o.float().square().mean() for o in outs if o.is_floating_point())
    loss.backward()
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, [o.detach() for o in outs]


def measure(name: str, batch: int, rounds: int) -> dict:
    model = onnx.load(str(models.model_path(name)))
    plain = OnnxModule(model)
    fast = OnnxModule(model).channels_last()
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        if i.name in plain.input_names:
            dims = [d.dim_value or batch for d in i.type.tensor_type.shape.dim]
            dims[0] = batch
            feeds[i.name] = torch.from_numpy(rng.standard_normal(dims).astype(np.float32))
    modules = {"default": plain, "channels-last": fast}
    outs = {k: _step(m, feeds)[1] for k, m in modules.items()}   # warm-up, and the outputs compared
    diff = max(float((a - b).abs().max() / (b.abs().max() + 1e-12))
               for a, b in zip(outs["default"], outs["channels-last"]))
    times: dict[str, list[float]] = {k: [] for k in modules}
    for _ in range(rounds):
        for k, m in modules.items():
            times[k].append(_step(m, feeds)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch, "rounds": rounds, "threads": torch.get_num_threads(),
            "seconds": {k: round(v, 4) for k, v in med.items()},
            "speedup": round(med["default"] / med["channels-last"], 3), "max_relative_difference": diff,
            "machine": _machine(), "torch": torch.__version__}


def render(rows: list[dict]) -> str:
    md = ["# One training step of the ONNX->torch executor, by weight layout", "",
          f"`python tools/bench_train_step.py`: forward, squared loss and backward on a random batch, "
          f"the two layouts interleaved, median of {rows[0]['rounds']} rounds each; torch {rows[0]['torch']}, "
          f"{rows[0]['threads']} threads; {rows[0]['machine']}. Outputs of the two layouts agree to the relative "
          "difference shown.", "",
          "| model | batch | default s | channels-last s | speedup | max relative difference |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['batch']} | {r['seconds']['default']} | {r['seconds']['channels-last']} | "
           f"{r['speedup']}× | {r['max_relative_difference']:.1e} |" for r in rows]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "efficientnet_lite0", "open_nsfw"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    rows = []
    for name in args.models:
        if not models.available(name):
            sys.exit(f"{name} is not in the data folder: python tools/fetch_data.py")
        rows.append(measure(name, args.batch, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_step.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "train_step.md").write_text(render(rows))


if __name__ == "__main__":
    main()
