#!/usr/bin/env python
"""Recovery settings compared on one cut, seed by seed (the seed draws the stopping samples and
the training order, and moves a result as much as a setting does).

    python tools/bench_recover_ab.py [--case mobilenetv2:0.3] [--vary augment.MIX 0 0.4] [--seeds 0 1 2] [--seconds 300]

The model is compressed once with ``--recover none`` as the recovery table does it (150 shuffled
calibration photos, compress's held-back quarter split off the same way); then, for every value of
the setting varied (a constant of a module of :mod:`onnxcc.recover`, e.g. ``train.LR_END``) and
every seed, the default recovery runs on the cut with the same time. Reported: the held-back damage
of the stage written on the 38 samples that chose it, top-1 agreement and logit cosine on the 50
photos never used, the time taken and the training steps of the longest block and of end-to-end
distillation. Appends to tools/results/recover_ab.jsonl and rewrites tools/results/recover_ab.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from bench_compress import _calibration, _machine, fidelity, logits, recovery_case  # noqa: E402

from onnxcc.compression import compress  # noqa: E402
from onnxcc.passes.normalize import normalize  # noqa: E402
from onnxcc.recover import recover_checked  # noqa: E402

RESULTS = REPO / "tools" / "results"


def run(name: str, flops: float, setting: str, values: list[float], seeds: list[int], seconds: float) -> list[dict]:
    module_name, attr = setting.rsplit(".", 1)
    module = importlib.import_module(f"onnxcc.recover.{module_name}")
    default = getattr(module, attr)
    orig, calib, held = recovery_case(name)
    data = _calibration(orig, calib)
    cut = compress(orig, flops, calib=data, recover="none").model
    teacher = normalize(orig).model
    ref = logits(orig, held)
    fit, choose = data.split()
    rows = []
    for seed in seeds:
        for value in values:
            setattr(module, attr, type(default)(value))
            t0 = time.perf_counter()
            res = recover_checked(cut, teacher, fit, choose, mode="blocks", seconds=seconds, seed=seed)
            rec, kept = res.record, res.record["kept"]
            row = {"model": name, "flops": flops, "setting": setting, "value": value, "seed": seed,
                   "seconds": seconds, "took": round(time.perf_counter() - t0), "kept": kept,
                   "choice_damage": round(rec["choice_damage"][kept], 4),
                   "cut_damage": round(rec["choice_damage"]["cut"], 4),
                   "block_steps": max((b["steps"] for b in rec.get("blocks", [])), default=0),
                   "end_steps": rec.get("end_to_end", {}).get("steps", 0),
                   **fidelity(ref, logits(res.model, held)), "machine": _machine(), "commit": _commit()}
            print(json.dumps(row), flush=True)
            rows.append(row)
    setattr(module, attr, default)
    return rows


def _commit() -> str:
    """The code measured: rows of one setting and value from different commits differ in what
    the setting did not vary."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:   # not a git checkout
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxcc"], cwd=REPO, capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def render(rows: list[dict]) -> str:
    md = ["# Recovery settings, seed by seed", "",
          "`python tools/bench_recover_ab.py`: one cut per model and target, the default recovery on it with the "
          "same time for every setting and seed; damage of the stage written on compress's 38 held-back samples "
          "(which chose it), top-1 agreement and logit cosine on 50 photos never used; the steps of the longest "
          "block and of end-to-end distillation, the cut's damage and the commit measured (blank: not recorded; each run of the tool "
          "compresses once, and plans follow the machine's timings, so runs can differ in their cut). `augment.MIX`: the largest weight of the "
          "second image blended into each augmented one; `train.LR_END`: end-to-end distillation's learning "
          "rate; `pipeline.BLOCK_SHARE`: the share of the gradient stages' time that block reconstruction gets.", "",
          "| model | --flops | setting | value | seed | seconds given | taken | block / end-to-end steps | stage written "
          "| damage (38 held back): cut, written | top-1 agreement (50 unseen) | cosine (50 unseen) | machine | commit |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['flops']} | {r['setting']} | {r['value']:g} | {r['seed']} | {r['seconds']:.0f} | "
           f"{r['took']} | {_steps(r)} | {r['kept']} | {_damage(r)} | {r['top1_agreement']:.0%} | "
           f"{r['cosine_mean']} | {r['machine']} | {r.get('commit', '')} |" for r in rows]
    return "\n".join(md) + "\n"


def _damage(row: dict) -> str:
    return f"{row['cut_damage']}, {row['choice_damage']}" if "cut_damage" in row else f"{row['choice_damage']}"


def _steps(row: dict) -> str:
    return f"{row['block_steps']} / {row['end_steps']}" if "block_steps" in row else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="mobilenetv2:0.3", help="MODEL:FLOPS")
    p.add_argument("--vary", nargs="+", default=["augment.MIX", "0", "0.4"], metavar=("MODULE.NAME", "VALUE"),
                   help="a recovery constant and the values it takes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=300.0)
    args = p.parse_args()
    name, flops = args.case.split(":")
    setting, *values = args.vary
    new = run(name, float(flops), setting, [float(v) for v in values], args.seeds, args.seconds)
    log = RESULTS / "recover_ab.jsonl"
    with log.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in new)
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    (RESULTS / "recover_ab.md").write_text(render(rows))


if __name__ == "__main__":
    main()
