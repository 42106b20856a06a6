"""The ``onnxcc`` command line, on top of the library: :mod:`.parser` reads the arguments,
:mod:`.commands` makes one library call per command, :mod:`.render` shows the result.

User errors (:class:`OnnxccError`, bad arguments) print one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys

from ..errors import OnnxccError
from .parser import build_parser
from .render import fail

__all__ = ["main", "build_parser"]


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
        fail(lines[-1].split(": ", 1)[-1] if "Original Traceback" in str(e) and lines else str(e))
    except KeyboardInterrupt:
        fail("interrupted")
