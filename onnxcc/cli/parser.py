"""The ``onnxcc`` arguments: one sub-parser per command, defaults read from the library's configs.

The only place argparse is imported. Bad arguments print one line and exit with code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import __version__
from ..benchmark import BATCH, RUNS
from ..calib import ImagePreprocess
from ..config import DEVICES, METHODS, OPTIMIZERS, PROVIDERS, RECOVER_MODES, CompressConfig, FinetuneConfig
from .commands import cmd_bench, cmd_compress, cmd_finetune, cmd_info, cmd_recover
from .render import fail


_IMAGE = ImagePreprocess()


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (exit 2) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        fail(f"{message} (see '{self.prog} --help')")


def recovery_flags(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--recover", choices=RECOVER_MODES if default is None else RECOVER_MODES[1:],
                   default=default,
                   help="after the cut: stats = per-channel statistics correction (numpy); blocks = that, then "
                        "block-wise reconstruction and end-to-end distillation (torch; the default where torch "
                        "is installed)")
    p.add_argument("--recover-time", type=float, metavar="SECONDS",
                   help="time for the whole recovery (default: grows with the model, "
                        "1 min + 33 min per GMAC of the compressed model, at most 10 min)")
    p.add_argument("--device", choices=DEVICES, default=CompressConfig.device,
                   help="where recovery trains (auto: the GPU when torch sees one)")


def _image_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image folder preprocessing (calibration and training folders)")
    g.add_argument("--image-size", type=int, nargs=2, default=list(_IMAGE.size), metavar=("H", "W"))
    g.add_argument("--mean", type=float, nargs="+", default=list(_IMAGE.mean), help="1 or 3 values")
    g.add_argument("--std", type=float, nargs="+", default=list(_IMAGE.std),
                   help="1 or 3 values (one-channel inputs read images as grey and use the first)")
    g.add_argument("--scale", type=float, default=_IMAGE.scale)
    g.add_argument("--layout", choices=["NCHW", "NHWC"], default=_IMAGE.layout)
    g.add_argument("--bgr", action="store_true")
    g.add_argument("--center-crop", type=float, default=_IMAGE.crop, metavar="F",
                   help="resize the shorter side to size / F, then crop the centre (0.875: ImageNet's 224 of 256; "
                        "1: the whole image)")


def _finetune_flags(p: argparse.ArgumentParser, epochs_help: str) -> None:
    d = FinetuneConfig
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
    g.add_argument("--workers", type=int, default=d.workers,
                   help="data loading processes (default: up to 4 for image folders, none for arrays)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="onnxcc", description="Compress CNNs directly on their ONNX graphs "
                                           "(Collaborative Compression: joint channel pruning + low rank).")
    p.add_argument("--version", action="version", version=f"onnxcc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    c.add_argument("--method", choices=METHODS, default=CompressConfig.method,
                   help="cc: joint (default); prune / decompose: single-technique ablations")
    c.add_argument("--steps", type=int, default=CompressConfig.steps,
                   help="multi-step removal: re-measure after each step (default: 3, fewer where one search "
                        "would measure for longer than --search-time)")
    c.add_argument("--search-time", type=float, default=CompressConfig.search_seconds, metavar="SECONDS",
                   help="what one search may measure for, estimated before it starts; a bigger model gets fewer "
                        "steps, then 8 instead of 16 samples per measurement (default: %(default)s)")
    c.add_argument("--tries", type=int, default=CompressConfig.tries, metavar="N",
                   help="independent searches on rotated calibration splits; the plan with the least damage "
                        "on all calibration samples is kept (default: 3 for cheap models, 2, then 1 as the "
                        "model's MACs times its compression units grow; a first search over 150 s is not "
                        "repeated)")
    c.add_argument("--report", help="report folder (default: OUTPUT.report/)")
    c.add_argument("--provider", choices=PROVIDERS, default=CompressConfig.provider)
    c.add_argument("--seed", type=int, default=CompressConfig.seed)
    c.add_argument("--threads", type=int, default=CompressConfig.threads,
                   help="onnxruntime threads the model will run with (latency measurements; 0: its default)")
    c.add_argument("--round-to", type=int, default=CompressConfig.round_to, metavar="M",
                   help="keep channel counts and ranks at multiples of M (default: the multiple this machine "
                        "runs fastest, measured; 16 on AVX-512, see tools/results/widths.md; 1 = finest MAC targets)")
    c.add_argument("--no-latency-model", action="store_true",
                   help="skip the layer latency measurements (MAC budget only; factorizations not checked "
                        "for speed)")
    c.add_argument("--force", action="store_true", help="allow overwriting the input model")
    c.add_argument("--ray-address", metavar="local|auto|HOST:PORT", default=CompressConfig.ray_address,
                   help="measure the candidates on Ray workers: local starts Ray here, auto joins the cluster "
                        "'ray start' runs, HOST:PORT a remote one (pip install 'onnxcc[ray]'); the plan is the "
                        "one measured in this process")
    c.add_argument("--ray-workers", type=int, default=CompressConfig.ray_workers, metavar="N",
                   help="Ray workers, one CPU each (--workers is fine-tuning's data loaders)")
    c.add_argument("--skip-memory-check", action="store_true",
                   help="start even where the run's estimated peak memory exceeds what is available")
    c.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run from the steps it measured (kept in OUTPUT.search/ "
                        "until OUTPUT is written)")
    c.add_argument("--finetune", type=Path, metavar="DATA",
                   help="then distil the original into the result, on the data of 'onnxcc finetune --data' "
                        "(image folder, .npy, .npz; needs torch)")
    _finetune_flags(c, "fine-tuning epochs with --finetune")
    recovery_flags(c)
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
    r.add_argument("--provider", choices=PROVIDERS, default=CompressConfig.provider)
    r.add_argument("--seed", type=int, default=CompressConfig.seed)
    r.add_argument("--force", action="store_true", help="allow overwriting an input model")
    recovery_flags(r, default="blocks")
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
    f.add_argument("--device", choices=DEVICES, default=FinetuneConfig.device,
                   help="where torch trains (auto: the GPU when torch sees one; under torchrun one per process)")
    f.add_argument("--seed", type=int, default=FinetuneConfig.seed, help="batch order and augmentation")
    _finetune_flags(f, "passes over the training data")
    _image_flags(f)
    f.set_defaults(func=cmd_finetune)

    b = sub.add_parser("bench", help="time models against each other: interleaved runs, p50/p90, speedup")
    b.add_argument("models", type=Path, nargs="+", help="ONNX models; the first is the baseline of the speedups")
    b.add_argument("--provider", choices=PROVIDERS, default=CompressConfig.provider)
    b.add_argument("--threads", type=int, default=CompressConfig.threads, help="intra-op threads per session (0: onnxruntime's default)")
    b.add_argument("--batch", type=int, default=BATCH, help="batch size of the random inputs")
    b.add_argument("--runs", type=int, default=RUNS, help="timed runs per model")
    b.add_argument("--input-shape", action="append", metavar="[NAME:]DIMS", help=shape_help)
    b.add_argument("--profile", action="store_true", help="also break the time down per op type and node (separate pass)")
    b.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    b.set_defaults(func=cmd_bench)
    return p


