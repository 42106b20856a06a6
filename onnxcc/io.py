"""Load and save ONNX models: never write to the input, always write atomically."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, UsageError

log = logging.getLogger(__name__)

# Protobuf refuses single messages over 2 GiB; above this we spill weights to a side file.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (with external data) or raise ModelLoadError with a one-line reason."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"expected an .onnx file, got a directory: {p}")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"model file is empty: {p}")
    try:
        model = onnx.load(str(p), load_external_data=True)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelLoadError(f"not a readable ONNX model: {p} ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - protobuf raises assorted types on garbage input
        raise ModelLoadError(f"not a readable ONNX model: {p} ({type(e).__name__})") from None
    if not model.graph.node:
        raise ModelLoadError(f"not an ONNX model (no graph nodes; truncated or wrong file?): {p}")
    if not model.opset_import:
        raise ModelLoadError(f"ONNX model declares no opset: {p}")
    return model


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> Path:
    """Validate an output path before any work is done, so a bad one costs nothing."""
    o = Path(out)
    if not o.parent.exists():
        raise UsageError(f"output folder does not exist: {o.parent}")
    if o.is_dir():
        raise UsageError(f"output path is a directory: {o}")
    for i in inputs:
        if Path(i).exists() and o.exists() and o.resolve() == Path(i).resolve() and not force:
            raise UsageError(f"output would overwrite the input model {i}; pass --force to allow it")
    return o


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    dest = Path(path)
    fd, tmp = tempfile.mkstemp(dir=dest.parent if str(dest.parent) else ".", prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (temp file in the same folder, then rename)."""
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if model.ByteSize() > _EXTERNAL_DATA_THRESHOLD:
            data_name = dest.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.debug("saved %s (%d bytes)", dest, dest.stat().st_size)
    return dest


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
