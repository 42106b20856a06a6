"""A compression report: built from a run (:func:`build_report`), written as report.json, a
readable report.md, and plots where a picture helps."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import RECOVER_STAGES as STAGES
from .io import atomic_write_text
from .passes.check import CheckRecord
from .passes.factorize import FactorizeRecord
from .passes.prune import PruneRecord

if TYPE_CHECKING:   # annotations only: writing a report needs none of them
    from .analysis.groups import Analysis
    from .calib import Calibration
    from .config import CompressConfig
    from .latency_model import LatencyModel
    from .passes.base import SequenceRecord
    from .search.plan import Plan

log = logging.getLogger(__name__)


def write_report(report: dict[str, Any], folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(folder / "report.json", json.dumps(report, indent=1)),
               atomic_write_text(folder / "report.md", to_markdown(report))]
    written += _plots(report, folder)
    return written


def to_markdown(r: dict[str, Any]) -> str:
    t, f, c = r["totals"], r["fidelity"], r["config"]
    lines = [
        "# onnxcc compression report", "",
        f"- method **{c['method']}**, target " + (f"{c['flops']:.0%} fewer MACs" if c.get("flops") is not None
                                                   else f"{c['latency']:.0%} less latency") + f" in {c['steps']} step(s)",
        f"- MACs {t['macs_before']:,} → {t['macs_after']:,} (**{t['mac_reduction']:.1%} removed**)",
        _latency_line(t.get("latency", {})),
        f"- params {t['params_before']:,} → {t['params_after']:,}",
        f"- {t['channels_removed']} channels removed, {_emptied(t)}{t['layers_factorized']} convs factorized, "
        f"{t['seconds']} s",
        _search_line(r.get("search", {})),
        *_memory_line(r.get("memory")),
        f"- calibration: {r['calibration']['source']} ({r['calibration']['samples']} samples"
        f"{', synthetic' if r['calibration']['synthetic'] else ''})",
        f"- fidelity on {f['samples']} held-back samples: cosine {f['cosine_mean']} (min {f['cosine_min']}), "
        f"relative L2 {f['rel_l2']}" + (f", top-1 agreement {f['top1_agreement']:.1%}" if "top1_agreement" in f else ""),
        *_recovery_lines(r.get("recovery", {})),
        "", "## Layers", "", "![per layer](layers.png)", "", "![sensitivity](sensitivity.png)", "",
        "| layer | op | in | out | rank | MACs before | after pruning | after | predicted ms before → after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for l in r["layers"]:
        rank = "-" if l["rank"][1] is None else f"{l['rank'][1]}/{l['rank'][0]}"
        widths = (f"{l['in_channels'][0]}→{l['in_channels'][1]} | {l['out_channels'][0]}→{l['out_channels'][1]}"
                  if not l.get("folded") else f"{l['in_channels'][0]} | {l['out_channels'][0]} (folded away)")
        ms = " → ".join(f"{v:.4f}" for v in l["predicted_ms"]) if "predicted_ms" in l else "-"
        lines.append(f"| {l['name']} | {l['op']} | {widths} | {rank} | {l['macs'][0]:,} | {l.get('macs_pruned', '-'):,} | "
                     f"{l['macs'][1]:,} | {ms} |")
    return "\n".join(lines) + "\n"


def _recovery_lines(rec: dict[str, Any]) -> list[str]:
    """Held-back fidelity after the cut and after each recovery stage, and the blocks' losses."""
    held = rec.get("held_out")
    if not held:
        return [f"- recovery: {rec.get('skipped', 'none')}"] if rec else []
    lines = ["", f"## Recovery ({rec['mode']}, {rec['seconds']} s; kept: {rec['kept']})", "",
             f"Trained on {rec['train_samples']} calibration samples, stopped on {rec['held_back_samples']} others; "
             "the fidelity below is on the held-back samples neither saw, which also chose the stage kept.", "",
             "| after | cosine | relative L2 | top-1 agreement | damage on the stopping samples | on the held-back |",
             "|---|---|---|---|---|---|"]
    for stage in STAGES:
        if stage in held:
            f = held[stage]
            top1 = f"{f['top1_agreement']:.1%}" if "top1_agreement" in f else "-"
            chosen = rec.get("choice_damage", {}).get(stage)
            lines.append(f"| {stage} | {f['cosine_mean']} | {f['rel_l2']} | {top1} | {rec['damage'][stage]:.4g} | "
                         f"{'-' if chosen is None else f'{chosen:.4g}'} |")
    blocks = [b for b in rec.get("blocks", []) if b.get("steps")]
    if blocks:
        lines += ["", "![recovery](recovery.png)", "",
                  "| block | nodes | weight layers | steps | held-back loss before | after |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['block']} | {b['nodes'][0]}–{b['nodes'][1] - 1} | {b['layers']} | {b['steps']} | "
                  f"{b['loss_before']:.4g} | {b['loss_after']:.4g} |" for b in blocks]
    return lines


def _emptied(t: dict[str, Any]) -> str:
    if not t.get("groups_emptied"):
        return ""
    return f"{t['groups_emptied']} branches emptied ({t['layers_folded']} convs folded away), "


def _memory_line(memory: dict[str, Any] | None) -> list[str]:
    if not memory:
        return []
    return [f"- memory: {memory['estimated_gb']} GB at the peak estimated before the search, "
            f"{memory['peak_rss_gb']} GB peak resident measured"]


def _search_line(search: dict[str, Any]) -> str:
    rounds = "".join(f"; search for {r['asked']:.1%} less latency: {r['predicted']:.1%} predicted, "
                     f"{r['measured']:.1%} measured" + (" (kept)" if i == search.get("latency_kept") else "")
                     for i, r in enumerate(search.get("latency_rounds", []), 1))
    timed = (f"; the first search took {search['first_search_seconds']:.0f} s, "
             f"{search['estimated_seconds']:.0f} s estimated before it measured" if "estimated_seconds" in search else "")
    if "full_size_estimated_seconds" in search:
        timed += f" (fewer steps or samples to fit --search-time, from {search['full_size_estimated_seconds']:.0f} s)"
    return _tries_line(search) + timed + rounds


def _tries_line(search: dict[str, Any]) -> str:
    if search.get("tries", 1) == 1:
        return "- one search"
    damages = ", ".join(f"{d:.4g}" for d in search["damages"])
    return (f"- {search['tries']} searches on rotated calibration splits, damage on {search['samples']} "
            f"calibration samples {damages}: kept search {search['kept']}")


def _latency_line(lat: dict[str, Any]) -> str:
    if not lat:
        return "- latency: not measured"
    line = f"- latency (measured, interleaved): {lat['ms_before']} → {lat['ms_after']} ms (**{lat['speedup']}×**)"
    if "predicted_ms_before" in lat:
        line += f"; latency model: {lat['predicted_ms_before']} → {lat['predicted_ms_after']} ms"
    return line


def _plots(r: dict[str, Any], folder: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: report without plots (pip install 'onnxcc[plot]')")
        return []
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cv in (r["sensitivity"][0] if r["sensitivity"] else {}).items():
        ax.plot(cv["saved_fraction"], cv["damage"], "-", lw=0.8, color="tab:blue" if name.startswith("group") else "tab:orange", alpha=0.6)
    ax.set_xlabel("fraction of the network's " + ("MACs" if r["config"].get("flops") is not None else "latency")
                  + " removed by this unit alone")
    ax.set_ylabel("output damage (relative squared error)")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title("sensitivity (step 1): blue = channel groups, orange = conv ranks")
    fig.tight_layout()
    out.append(folder / "sensitivity.png")
    fig.savefig(out[-1], dpi=110)
    plt.close(fig)

    out.append(_layers_plot(r["layers"], folder / "layers.png", plt))
    blocks = [b for b in r.get("recovery", {}).get("blocks", []) if b.get("steps")]
    if blocks:
        fig, ax = plt.subplots(figsize=(max(6, len(blocks) * 0.3), 3.5))
        x = np.arange(len(blocks))
        ax.bar(x - 0.2, [b["loss_before"] for b in blocks], 0.4, color="lightgray", label="fed the compressed upstream")
        ax.bar(x + 0.2, [b["loss_after"] for b in blocks], 0.4, color="tab:green", label="after reconstruction")
        ax.set_xticks(x, [str(b["block"]) for b in blocks])
        ax.set_xlabel("block (graph order)")
        ax.set_ylabel("held-back loss (MSE / variance)")
        ax.legend(fontsize=8)
        ax.set_title("block-wise reconstruction")
        fig.tight_layout()
        out.append(folder / "recovery.png")
        fig.savefig(out[-1], dpi=110)
        plt.close(fig)
    return out


def _layers_plot(layers: list[dict[str, Any]], path: Path, plt) -> Path:
    """One row per layer, named: its MACs before, after pruning alone and after pruning and
    factorization; beside them its predicted time before and after where the latency model ran."""
    layers = [l for l in layers if l["macs"][0] > 0]
    timed = all("predicted_ms" in l for l in layers)
    y = np.arange(len(layers))[::-1]
    fig, axes = plt.subplots(1, 2 if timed else 1, sharey=True, squeeze=False,
                             figsize=(12 if timed else 8, 1.2 + 0.17 * len(layers)))
    ax = axes[0][0]
    ax.barh(y, [l["macs"][0] for l in layers], 0.8, color="lightgray", label="before")
    ax.barh(y, [l["macs_pruned"] for l in layers], 0.8, color="tab:blue", label="after pruning")
    ax.barh(y, [l["macs"][1] for l in layers], 0.45, color="tab:green", label="after pruning and factorization")
    ax.set_yticks(y, [l["name"][-40:] + (" (factorized)" if l["rank"][1] is not None else "") for l in layers],
                  fontsize=6)
    ax.set_xlabel("MACs")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.7)
    ax.set_title("per layer: pruned (blue) and factorized (green) apart", fontsize=9)
    if timed:
        ax = axes[0][1]
        ax.barh(y, [l["predicted_ms"][0] for l in layers], 0.8, color="lightgray", label="before")
        ax.barh(y, [l["predicted_ms"][1] for l in layers], 0.45, color="tab:green", label="after")
        ax.set_xlabel("predicted ms (latency model, measured on this machine)")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.7)
        ax.set_title("per layer time", fontsize=9)
    ax.set_ylim(-0.8, len(layers) - 0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(a: Analysis, plan: Plan, cfg: CompressConfig, curves: list[dict], rewrite: SequenceRecord,
                 final: CheckRecord, fidelity: dict[str, Any], data: Calibration, lat: LatencyModel | None,
                 timing: dict[str, float], search: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The report of one run, from the plan and the records of the rewrite's passes and of the
    final check: per layer before/after (channels, rank, MACs, predicted ms), the removed channels
    per group, the measured damage curves (of the try kept), the tries' damages, totals and
    held-out fidelity."""
    prune_rec = next(r for r in rewrite.records if isinstance(r, PruneRecord))
    fact_rec = next(r for r in rewrite.records if isinstance(r, FactorizeRecord))
    kept = plan.kept()
    dead = a.dead(kept)
    layers = []
    for l in a.layers:
        rank = plan.ranks.get(l.key)
        cin, cout = a.channels(l, kept)
        layers.append({
            "name": l.name, "tensor": l.key, "op": l.op, "kernel": list(l.kernel),
            "in_channels": [l.cin, cin], "out_channels": [l.cout, cout],
            "rank": [min(l.cout, l.cin * l.kk) if l.op == "Conv" else None, rank],
            "macs": [int(l.macs), int(round(a.layer_macs(l, kept, rank)))],
            "macs_pruned": int(round(a.layer_macs(l, kept, None))),
            "folded": l.key in dead,
        })
        if lat is not None:
            layers[-1]["predicted_ms"] = [round(lat.layer_seconds(l, {}) * 1e3, 5),
                                          round(lat.layer_seconds(l, kept, rank) * 1e3, 5)]
    groups = {str(gid): {"channels": [a.groups[gid].size, int(m.sum())],
                         "removed": [int(i) for i in np.flatnonzero(~m)]}
              for gid, m in plan.keep.items() if not m.all()}
    macs_after = final.macs
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "calibration": {"source": data.source, "samples": len(data), "synthetic": data.synthetic},
        "totals": {
            "macs_before": int(a.total_macs), "macs_after": int(macs_after),
            "mac_reduction": round(1 - macs_after / a.total_macs, 4),
            "planned_macs_after": final.planned_macs,
            "params_before": final.max_params, "params_after": final.params,
            "channels_removed": int(prune_rec.channels_removed), "layers_factorized": len(fact_rec.layers),
            "groups_emptied": sum(n == 0 for n in kept.values()), "layers_folded": len(dead),
            "latency": {**timing, **_predicted(lat, plan)},
            "seconds": round(seconds, 1),
        },
        "fidelity": fidelity,
        "search": search,
        "layers": layers, "groups": groups, "sensitivity": curves,
    }


def _predicted(lat: LatencyModel | None, plan: Plan) -> dict[str, float]:
    if lat is None:
        return {}
    before, after = lat.seconds(), lat.seconds(plan.kept(), plan.ranks)
    return {"predicted_ms_before": round(before * 1e3, 4), "predicted_ms_after": round(after * 1e3, 4),
            "predicted_reduction": round(1 - after / before, 4)}
