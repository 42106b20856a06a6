"""How the command line shows things: the consoles, one-line errors, progress, tables, summaries.

The only place rich is imported. Piped or redirected output keeps wide tables on one line per row
instead of 80 columns.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.table import Table

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"onnxcc: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))



def fidelity_text(f: dict) -> str:
    return (f"cosine {f['cosine_mean']}, relative error {f['rel_l2']}"
            + (f", top-1 agreement {f['top1_agreement']:.1%}" if "top1_agreement" in f else ""))


def recovery_text(rec: dict) -> str:
    """' (cosine 0.83 after the cut, recovery kept blocks)' where recovery ran."""
    cut = rec.get("held_out", {}).get("cut")
    return f" (cosine {cut['cosine_mean']} after the cut, recovery kept {rec['kept']})" if cut else ""




@contextmanager
def progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback: a rich bar on a terminal, plain lines on stdout otherwise; both say
    how long the current stage has left."""
    if not err.is_terminal:
        yield LineProgress()
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        stage = [None]

        def update(desc: str, done: int, total: int) -> None:
            if desc != stage[0]:   # a new stage: its rate says nothing of the last one's
                stage[0] = desc
                bar.reset(task, total=total, completed=done, description=desc)
            else:
                bar.update(task, completed=done, total=total)

        yield update


class LineProgress:
    """Progress where no bar can show (a log file, CI, a pipe): a line when the work changes and
    at most every ``every`` seconds within it, so an hour of measuring is not an hour of silence,
    with the time the stage has left at its rate so far. On stdout: stderr is kept for the one
    line of an error."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.desc, self.last, self.start = every, None, 0.0, time.monotonic()
        self.stage_start, self.stage_done = self.start, 0

    def __call__(self, desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        if desc != self.desc:
            self.stage_start, self.stage_done = now, done
        elif now - self.last < self.every:
            return
        self.desc, self.last = desc, now
        rate = (done - self.stage_done) / (now - self.stage_start) if now > self.stage_start else 0.0
        left = f", ~{_duration((total - done) / rate)} left" if rate > 0 and total > done else ""
        print(f"[{now - self.start:6.0f} s] {desc} {done}/{total}{left}", flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def epoch_line(row: dict) -> None:
    """One line per epoch, on a terminal or not: the numbers a long run is watched by."""
    metrics = "".join(f", {k.replace('_', ' ')} {row[k]:.2%}" if k.endswith("acc") else f", {k.replace('_', ' ')} {row[k]:.4g}"
                      for k in ("val_acc", "val_loss") if k in row)
    left = row["eta_seconds"]
    out.print(f"epoch {row['epoch']}/{row['epochs']}: train loss {row['train_loss']:.4g}{metrics}, lr {row['lr']:.2e}, "
              f"{row['seconds']:.0f} s" + (f", ~{left / 60:.1f} min left" if left else ""), highlight=False)



def info_table(d: dict) -> None:
    """``onnxcc info``: one row per layer, then the totals."""
    t = Table(title=f"{Path(d['model']).name}  inputs {d['input_shapes']}")
    for col in ("layer", "op", "kernel", "in", "out", "groups", "MACs", "params", "ch.group", "prune", "factor", "why not"):
        t.add_column(col, overflow="fold", justify="right" if col in ("in", "out", "groups", "MACs", "params") else "left")
    for l in d["layers"]:
        t.add_row(l["name"][-40:], l["op"], "x".join(map(str, l["kernel"])) or "-", str(l["in_channels"]),
                  str(l["out_channels"]), str(l["groups"]), fmt_count(l["macs"]), fmt_count(l["params"]),
                  ",".join(map(str, l["out_groups"])) or "-", "yes" if l["prunable"] else "no",
                  "yes" if l["factorizable"] else "no", l["why_not"][:60])
    out.print(t)
    prunable = sum(g["prunable"] for g in d["groups"])
    out.print(f"[bold]MACs[/] {fmt_count(d['macs'])} ({d['macs']:,})   [bold]params[/] {fmt_count(d['params'])}   "
              f"[bold]compressible[/] {fmt_count(d['compressible_macs'])} ({d['compressible_fraction']:.1%})   "
              f"[bold]channel groups[/] {len(d['groups'])} ({prunable} prunable, "
              f"{sum(g['droppable'] for g in d['groups'])} of them may be emptied)")
    if d["quantized"]:
        out.print("[yellow]quantized model[/]: its integer ops (QLinearConv, ConvInteger, ...) carry no counted MACs "
                  "and onnxcc does not compress it; compress the float model, then quantize")


def compress_summary(output: Path, report: dict, report_dir: Path) -> None:
    t, f = report["totals"], report["fidelity"]
    out.print(f"[bold green]wrote[/] {output}: MACs {fmt_count(t['macs_before'])} → {fmt_count(t['macs_after'])} "
              f"([bold]{t['mac_reduction']:.1%}[/] removed), params {fmt_count(t['params_before'])} → "
              f"{fmt_count(t['params_after'])}; held-out {fidelity_text(f)}{recovery_text(report.get('recovery', {}))}"
              f"; {t['latency']['speedup']:.2f}× faster here ({t['latency']['ms_before']:.2f} → "
              f"{t['latency']['ms_after']:.2f} ms); report in {report_dir}/")

def bench_tables(result: dict, console: Console = out) -> None:
    """Rich tables: one row per model, then per-model profile tables when present."""

    t = Table(title=f"{result['provider']}, {result['threads']} threads, batch {result['batch']}, "
                    f"{result['runs']} runs per model (interleaved by {result['per_round']})")
    for col in ("model", "p50 ms", "p90 ms", "mean ms", "std ms", "speedup"):
        t.add_column(col, justify="left" if col == "model" else "right",
                     overflow="fold" if col == "model" else "ellipsis")
    for m in result["models"]:
        t.add_row(m["name"], f"{m['p50_ms']:.3f}", f"{m['p90_ms']:.3f}", f"{m['mean_ms']:.3f}",
                  f"{m['std_ms']:.3f}", f"{m['speedup']:.2f}x")
    console.print(t)
    for m in result["models"]:
        prof = m.get("profile")
        if not prof:
            continue
        ops = Table(title=f"{m['name']}: kernel time per op type ({prof['kernel_ms']:.3f} ms per run)")
        for col in ("op type", "nodes", "ms", "%"):
            ops.add_column(col, justify="left" if col == "op type" else "right")
        for d in prof["by_op_type"]:
            ops.add_row(d["op_type"], str(d["count"]), f"{d['ms']:.3f}", f"{d['pct']:.1f}")
        console.print(ops)
        nodes = Table(title=f"{m['name']}: top {len(prof['top_nodes'])} nodes")
        for col in ("node", "op type", "ms", "%"):
            nodes.add_column(col, justify="right" if col in ("ms", "%") else "left", overflow="fold")
        for d in prof["top_nodes"]:
            nodes.add_row(d["node"][-50:], d["op_type"], f"{d['ms']:.3f}", f"{d['pct']:.1f}")
        console.print(nodes)
