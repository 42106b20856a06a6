"""The ``onnxcc`` command line: parses arguments, calls the public API, renders with rich.

User errors (:class:`OnnxccError`, bad arguments) print one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import InputShapeError, OnnxccError

out = Console()
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
    from .inspect import inspect_model

    ins = inspect_model(args.model, parse_input_shapes(args.input_shape))
    d = {"model": str(args.model), **ins.to_dict()}
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
              f"[bold]channel groups[/] {len(d['groups'])} ({prunable} prunable)")
    return 0


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
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted")
