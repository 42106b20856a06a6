"""The ``onnxcc`` command line: parses arguments, calls the public API, renders with rich.

User errors (:class:`OnnxccError`, bad arguments) print one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.table import Table

from .errors import InputShapeError, OnnxccError, UsageError

# Piped or redirected output keeps wide tables on one line per row instead of 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str) -> None:
    err.print(f"onnxcc: error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(2)


def parse_input_shapes(specs: list[str] | None) -> dict[str | None, tuple[int, ...]]:
    """``["1,3,224,224"]`` or ``["images:1,3,640,640", ...]`` → {name or None: shape}."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise InputShapeError(f"bad --input-shape {spec!r}; expected e.g. 1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputShapeError(f"bad --input-shape {spec!r}; dims must be positive integers")
        shapes[name or None] = shape
    return shapes


def fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_info(args: argparse.Namespace) -> int:
    from .inspect import inspect_model, is_quantized

    ins = inspect_model(args.model, parse_input_shapes(args.input_shape))
    d = {"model": str(args.model), **ins.to_dict(), "quantized": is_quantized(ins.model)}
    if args.json:
        sys.stdout.write(json.dumps(d) + "\n")
        return 0
    t = Table(title=f"{Path(args.model).name}  inputs {d['input_shapes']}")
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
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import CompressConfig, compress
    from .io import check_output_path, load_model, save_model
    from .report import write_report

    CompressConfig(flops=args.flops, latency=args.latency, round_to=args.round_to, steps=args.steps,
                   tries=args.tries, recover=args.recover, recover_seconds=args.recover_time,
                   min_fidelity=args.min_fidelity).validate()
    check_output_path(args.output, [args.model], args.force)
    if args.report and Path(args.report).exists() and not Path(args.report).is_dir():
        raise UsageError(f"--report must be a folder: {args.report}")
    model = load_model(args.model)
    train = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("compress runs in one process: run it alone, then 'torchrun … -m onnxcc finetune'")
    if args.finetune:
        from .finetune import check_trainable, open_samples

        # bad settings, a missing torch, an op the executor lacks or bad data fail before minutes of work
        _finetune_config(args).validate()
        check_trainable(model, before_compression=True)
        train = open_samples(args.finetune, model, _preprocess(args))
    with _progress() as progress:
        result = compress(model, args.flops, latency=args.latency, calib=args.calib,
                          input_shape=parse_input_shapes(args.input_shape), method=args.method,
                          steps=args.steps, provider=args.provider, seed=args.seed, progress=progress,
                          preprocess=_preprocess(args), round_to=args.round_to, threads=args.threads,
                          tries=args.tries, latency_aware=not args.no_latency_model, recover=args.recover,
                          recover_seconds=args.recover_time, min_fidelity=args.min_fidelity, device=args.device)
        if train is not None:
            from .finetune import finetune_verified

            tuned, history = finetune_verified(result.model, model, train, config=_finetune_config(args),
                                               progress=progress, on_epoch=_epoch_line)
            result.report["finetune"] = history
            result.model = tuned
    save_model(result.model, args.output)
    report_dir = Path(args.report) if args.report else Path(str(args.output) + ".report")
    write_report(result.report, report_dir)
    t, f = result.report["totals"], result.report["fidelity"]
    out.print(f"[bold green]wrote[/] {args.output}: MACs {fmt_count(t['macs_before'])} → {fmt_count(t['macs_after'])} "
              f"([bold]{t['mac_reduction']:.1%}[/] removed), params {fmt_count(t['params_before'])} → "
              f"{fmt_count(t['params_after'])}; held-out {_fidelity_text(f)}{_recovery_text(result.report.get('recovery', {}))}"
              f"; {t['latency']['speedup']:.2f}× faster here ({t['latency']['ms_before']:.2f} → "
              f"{t['latency']['ms_after']:.2f} ms); report in {report_dir}/")
    return 0


def _fidelity_text(f: dict) -> str:
    return (f"cosine {f['cosine_mean']}, relative error {f['rel_l2']}"
            + (f", top-1 agreement {f['top1_agreement']:.1%}" if "top1_agreement" in f else ""))


def _recovery_text(rec: dict) -> str:
    """' (cosine 0.83 after the cut, recovery kept blocks)' where recovery ran."""
    cut = rec.get("held_out", {}).get("cut")
    return f" (cosine {cut['cosine_mean']} after the cut, recovery kept {rec['kept']})" if cut else ""


def _preprocess(args: argparse.Namespace):
    from .calib import ImagePreprocess

    return ImagePreprocess(size=tuple(args.image_size), mean=tuple(args.mean), std=tuple(args.std),
                           scale=args.scale, layout=args.layout, bgr=args.bgr, crop=args.center_crop)


def cmd_recover(args: argparse.Namespace) -> int:
    from .calib import load_calibration
    from .io import check_output_path, load_model, save_model
    from .recover import MIN_SAMPLES, recover_checked

    if args.recover_time is not None and args.recover_time < 0:
        raise UsageError("--recover-time must not be negative")
    check_output_path(args.output, [args.model, args.teacher], args.force)
    student, teacher = load_model(args.model), load_model(args.teacher)
    data = load_calibration(student, args.calib, pinned=parse_input_shapes(args.input_shape), seed=args.seed,
                            preprocess=_preprocess(args))
    if data.synthetic:
        raise UsageError("recover needs real samples: give --calib")
    fit, held = data.split()
    if len(fit) < MIN_SAMPLES:
        raise UsageError(f"recovery needs more samples: {len(data)} given, {len(held)} of them held back to verify, "
                         f"{len(fit)} left to tune on ({MIN_SAMPLES} at least)")
    with _progress() as progress:
        res = recover_checked(student, teacher, fit, held, mode=args.recover, seconds=args.recover_time,
                              seed=args.seed, provider=args.provider, device=args.device, progress=progress)
    save_model(res.model, args.output)
    final = res.record["held_out"][res.record["kept"]]
    out.print(f"[bold green]wrote[/] {args.output}: held-out {_fidelity_text(final)}{_recovery_text(res.record)}; "
              f"{res.record['seconds']} s")
    return 0


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """A progress callback: a rich bar on a terminal, plain lines on stdout otherwise."""
    if not err.is_terminal:
        yield _LineProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        yield lambda desc, done, total: bar.update(task, description=desc, completed=done, total=total)


class _LineProgress:
    """Progress where no bar can show (a log file, CI, a pipe): a line when the work changes and
    at most every ``every`` seconds within it, so an hour of measuring is not an hour of silence.
    On stdout: stderr is kept for the one line of an error."""

    def __init__(self, every: float = 30.0) -> None:
        self.every, self.desc, self.last, self.start = every, None, 0.0, time.monotonic()

    def __call__(self, desc: str, done: int, total: int) -> None:
        now = time.monotonic()
        if desc == self.desc and now - self.last < self.every:
            return
        self.desc, self.last = desc, now
        print(f"[{now - self.start:6.0f} s] {desc} {done}/{total}", flush=True)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import run_finetune_cli

    with _progress() as progress:
        r = run_finetune_cli(args.model, args.teacher, args.data, args.output, args.val, _finetune_config(args),
                             preprocess=_preprocess(args), resume=args.resume, progress=progress, on_epoch=_epoch_line)
    if not r["main"]:
        return 0
    h = r["history"]
    out.print(f"[bold green]wrote[/] {r['output']}: {len(h['epochs'])} epoch(s), kept epoch {h['best_epoch']} "
              f"(by {h['selected_by']}); last train loss {h['epochs'][-1]['train_loss']:.4g}")
    return 0


def _finetune_config(args: argparse.Namespace):
    from .config import FinetuneConfig

    return FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer,
                          warmup=args.warmup, augment=not args.no_augment, batchnorm=args.batchnorm,
                          device=args.device,
                          workers=args.workers, seed=args.seed)


def _epoch_line(row: dict) -> None:
    """One line per epoch, on a terminal or not: the numbers a long run is watched by."""
    metrics = "".join(f", {k.replace('_', ' ')} {row[k]:.2%}" if k.endswith("acc") else f", {k.replace('_', ' ')} {row[k]:.4g}"
                      for k in ("val_acc", "val_loss") if k in row)
    left = row["eta_seconds"]
    out.print(f"epoch {row['epoch']}/{row['epochs']}: train loss {row['train_loss']:.4g}{metrics}, lr {row['lr']:.2e}, "
              f"{row['seconds']:.0f} s" + (f", ~{left / 60:.1f} min left" if left else ""), highlight=False)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import cmd_bench as run_bench

    return run_bench(args)


def _recovery_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recover", choices=["none", "stats", "blocks"] if default is None else ["stats", "blocks"],
                   default=default,
                   help="after the cut: stats = per-channel statistics correction (numpy); blocks = that, then "
                        "block-wise reconstruction and end-to-end distillation (torch; the default where torch "
                        "is installed)")
    p.add_argument("--recover-time", type=float, metavar="SECONDS",
                   help="time for block reconstruction and distillation (default: grows with the model, "
                        "1 min + 33 min per GMAC of the compressed model, at most 10 min)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where recovery trains (auto: the GPU when torch sees one)")


def _image_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folder preprocessing (calibration and training folders)")
    g.add_argument("--image-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    g.add_argument("--mean", type=float, nargs="+", default=[0.485, 0.456, 0.406], help="1 or 3 values")
    g.add_argument("--std", type=float, nargs="+", default=[0.229, 0.224, 0.225],
                   help="1 or 3 values (one-channel inputs read images as grey and use the first)")
    g.add_argument("--scale", type=float, default=1 / 255)
    g.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    g.add_argument("--bgr", action="store_true")
    g.add_argument("--center-crop", type=float, default=0.875, metavar="F",
                   help="resize the shorter side to size / F, then crop the centre (0.875: ImageNet's 224 of 256; "
                        "1: the whole image)")


def _finetune_flags(p: argparse.ArgumentParser, epochs_help: str) -> None:
    from .config import OPTIMIZERS, FinetuneConfig

    d = FinetuneConfig()
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=int, default=d.epochs, help=epochs_help)
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch (split across torchrun's processes)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--warmup", type=float, default=d.warmup, metavar="SHARE",
                   help="share of the steps with a linear warm-up before the cosine decay")
    g.add_argument("--no-augment", action="store_true",
                   help="train on the images as given (default: random resized crops and flips of image inputs)")
    g.add_argument("--batchnorm", action="store_true",
                   help="train with a BatchNorm after each Conv with a bias, on batch statistics as a torch pipeline "
                        "trains, folded back into the Convs when done (models with a dynamic batch)")
    g.add_argument("--workers", type=int, default=None,
                   help="data loading processes (default: up to 4 for image folders, none for arrays)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="onnxcc", description="Compress CNNs directly on their ONNX graphs "
                                           "(Collaborative Compression: joint channel pruning + low rank).")
    p.add_argument("--version", action="version", version=f"onnxcc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    shape_help = "pin an input shape, e.g. 1,3,224,224 or NAME:1,3,224,224 (repeatable)"

    info = sub.add_parser("info", help="layers, MACs, params, channel groups, what can be compressed")
    info.add_argument("model", type=Path, help="ONNX model")
    info.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS", help=shape_help)
    info.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    info.set_defaults(func=cmd_info)

    c = sub.add_parser("compress", help="remove a fraction of the MACs by joint pruning + low rank")
    c.add_argument("model", type=Path, help="ONNX model")
    target = c.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops", type=float, help="fraction of MACs to remove, in (0, 1)")
    target.add_argument("--latency", type=float,
                        help="fraction of the measured latency to remove, in (0, 1) (on --provider, --threads)")
    c.add_argument("-o", "--output", type=Path, required=True, help="compressed model path")
    c.add_argument("--calib", help=".npy (N, ...) for a single input, .npz keyed by input name, or an image folder")
    c.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS", help=shape_help)
    c.add_argument("--method", choices=["cc", "prune", "decompose"], default="cc",
                   help="cc: joint (default); prune / decompose: single-technique ablations")
    c.add_argument("--steps", type=int, default=3, help="multi-step removal: re-measure after each step")
    c.add_argument("--tries", type=int, default=None, metavar="N",
                   help="independent searches on rotated calibration splits; the plan with the least damage "
                        "on all calibration samples is kept (default: 3 for cheap models, 2, then 1 as the "
                        "model's MACs times its compression units grow; a first search over 150 s is not "
                        "repeated)")
    c.add_argument("--report", help="report folder (default: OUTPUT.report/)")
    c.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=0,
                   help="onnxruntime threads the model will run with (latency measurements; 0: its default)")
    c.add_argument("--round-to", type=int, default=None, metavar="M",
                   help="keep channel counts and ranks at multiples of M (default: the multiple this machine "
                        "runs fastest, measured; 16 on AVX-512, see tools/results/widths.md; 1 = finest MAC targets)")
    c.add_argument("--no-latency-model", action="store_true",
                   help="skip the layer latency measurements (MAC budget only; factorizations not checked "
                        "for speed)")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("--finetune", type=Path, metavar="DATA",
                   help="then distil the original into the result, on the data of 'onnxcc finetune --data' "
                        "(image folder, .npy, .npz; needs torch)")
    _finetune_flags(c, "fine-tuning epochs with --finetune")
    _recovery_flags(c)
    c.add_argument("--min-fidelity", type=float, metavar="C",
                   help="refuse to write a model whose held-back cosine is below C (exit 2)")
    _image_flags(c)
    c.set_defaults(func=cmd_compress)

    r = sub.add_parser("recover", help="give back accuracy from unlabeled samples: statistics, block-wise "
                                       "reconstruction, distillation (only weights change)")
    r.add_argument("model", type=Path, help="compressed ONNX model")
    r.add_argument("--teacher", type=Path, required=True, help="the original ONNX model")
    r.add_argument("--calib", required=True, help=".npy / .npz / image folder of unlabeled samples")
    r.add_argument("-o", "--output", type=Path, required=True, help="recovered model path")
    r.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS", help=shape_help)
    r.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--force", action="store_true", help="allow overwriting an input model")
    _recovery_flags(r, default="blocks")
    _image_flags(r)
    r.set_defaults(func=cmd_recover)

    f = sub.add_parser("finetune", help="recover accuracy: distil the original model into the compressed one (needs torch)")
    f.add_argument("model", type=Path, help="compressed ONNX model (the student)")
    f.add_argument("--teacher", type=Path, required=True, help="the original ONNX model")
    f.add_argument("--data", type=Path, required=True,
                   help="an image folder (class sub-folders give labels; with several inputs a sub-folder per "
                        "input name), a .npy of inputs, or an .npz with x or one array per input name and "
                        "optional integer labels y; read as used (memory-mapped arrays, images decoded by "
                        "--workers), never whole")
    f.add_argument("-o", "--output", type=Path, required=True,
                   help="fine-tuned model path (checkpoints live in OUTPUT.ckpt/ until it is written)")
    f.add_argument("--val", type=Path, help="validation data (same forms); picks the best epoch")
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUTPUT.ckpt/")
    f.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where torch trains (auto: the GPU when torch sees one; under torchrun one per process)")
    f.add_argument("--seed", type=int, default=0, help="batch order and augmentation")
    _finetune_flags(f, "passes over the training data")
    _image_flags(f)
    f.set_defaults(func=cmd_finetune)

    b = sub.add_parser("bench", help="time models against each other: interleaved runs, p50/p90, speedup")
    b.add_argument("models", type=Path, nargs="+", help="ONNX models; the first is the baseline of the speedups")
    b.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--threads", type=int, default=2, help="intra-op threads per session (0: onnxruntime's default)")
    b.add_argument("--batch", type=int, default=1, help="batch size of the random inputs")
    b.add_argument("--runs", type=int, default=50, help="timed runs per model")
    b.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS", help=shape_help)
    b.add_argument("--profile", action="store_true", help="also break the time down per op type and node (separate pass)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="onnxcc: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.getLogger("onnxcc").setLevel(logging.DEBUG)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        sys.exit(args.func(args))
    except OnnxccError as e:
        # an error raised in a DataLoader worker comes back with the worker's traceback appended
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        _fail(lines[-1].split(": ", 1)[-1] if "Original Traceback" in str(e) and lines else str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
