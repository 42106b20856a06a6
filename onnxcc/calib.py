"""Calibration data: load (.npy / .npz / image folder), validate against the model, split.

A slice is held back from whatever the user gives, so the reported fidelity is measured on
inputs the compressor never saw.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .analysis.view import graph_inputs, input_dtype, random_feeds, resolve_input_shapes
from .errors import CalibrationError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class ImagePreprocess:
    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: float = 1 / 255
    layout: str = "NCHW"
    bgr: bool = False
    crop: float = 0.875   # the centre crop's side over the resized shorter side (ImageNet's 224/256); 1: whole image

    def __post_init__(self) -> None:
        if not 0 < self.crop <= 1:
            raise CalibrationError(f"--center-crop is a fraction in (0, 1], got {self.crop}")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3) or min(self.std) <= 0:
            raise CalibrationError("--mean and --std take 1 or 3 values, the std positive")


@dataclass
class Calibration:
    """Inputs keyed by graph-input name, each with a leading sample axis."""

    samples: dict[str, np.ndarray]
    source: str
    synthetic: bool = False

    def __len__(self) -> int:
        return len(next(iter(self.samples.values())))

    def take(self, idx) -> dict[str, np.ndarray]:
        return {k: v[idx] for k, v in self.samples.items()}

    def split(self, holdout: float = 0.25) -> tuple["Calibration", "Calibration"]:
        n = len(self)
        if n < 2:
            raise CalibrationError("calibration data needs at least 2 samples (some are held back to verify)")
        k = max(1, int(round(n * holdout)))
        return (Calibration(self.take(slice(0, n - k)), self.source, self.synthetic),
                Calibration(self.take(slice(n - k, n)), self.source + " (held out)", self.synthetic))


def load_calibration(model: onnx.ModelProto, path: str | Path | None, *, samples: int = 32, seed: int = 0,
                     pinned: dict | None = None, preprocess: ImagePreprocess | None = None) -> Calibration:
    inputs = graph_inputs(model)
    if path is None:
        shapes = resolve_input_shapes(model, pinned)
        log.warning("no --calib given: using random normal inputs; compression quality will be far "
                    "better with real, preprocessed samples")
        feeds = random_feeds(model, shapes, seed=seed, batch=samples)
        return Calibration(feeds, "random", synthetic=True)
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"calibration data not found: {p}")
    if p.is_dir():
        if len(inputs) != 1:
            raise CalibrationError("an image folder can only feed a single-input model; use .npz")
        data = {inputs[0].name: _load_images(p, preprocess or ImagePreprocess())}
    elif p.suffix == ".npy":
        if len(inputs) != 1:
            raise CalibrationError(f"the model has {len(inputs)} inputs; give a .npz keyed by input name")
        data = {inputs[0].name: _np_load(p)}
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        missing = {i.name for i in inputs} - set(data)
        if missing:
            raise CalibrationError(f"{p.name} lacks arrays for input(s) {sorted(missing)}; has {sorted(data)}")
    else:
        raise CalibrationError(f"unsupported calibration file {p.name}: use .npy, .npz or an image folder")
    out = {}
    for vi in inputs:
        arr = np.asarray(data[vi.name])
        dims = vi.type.tensor_type.shape.dim
        if arr.ndim != len(dims):
            raise CalibrationError(f"calibration array for {vi.name!r} has shape {arr.shape}; expected "
                                   f"(N, ...) with rank {len(dims)} like the model input")
        for k, d in enumerate(dims[1:], start=1):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != arr.shape[k]:
                raise CalibrationError(f"calibration array for {vi.name!r} has shape {arr.shape}; the model "
                                       f"expects dim {k} = {d.dim_value}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CalibrationError(f"calibration array for {vi.name!r} holds NaN or Inf")
        if len(arr) < 2:
            raise CalibrationError("calibration data needs at least 2 samples")
        out[vi.name] = arr.astype(input_dtype(vi))
    return Calibration(out, str(p))


def _np_load(p: Path) -> np.ndarray:
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CalibrationError(f"cannot read {p.name}: {str(e).splitlines()[0][:200]}") from None


def image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, pp: ImagePreprocess, grey: bool = False) -> np.ndarray:
    """One image as the model reads it: shorter side resized to size / crop, centre-cropped to
    size, scaled, normalised, in ``pp.layout`` without a batch axis (float32); with ``grey`` one
    luminance channel, normalised by the first mean and std."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with matplotlib
        raise CalibrationError("reading image folders needs pillow: pip install pillow") from None
    h, w = pp.size
    try:
        with Image.open(path) as im:
            img = im.convert("L" if grey else "RGB")
    except OSError as e:
        raise CalibrationError(f"cannot read image {path}: {str(e).splitlines()[0][:120]}") from None
    s = max(h, w) / pp.crop / min(img.size)
    img = img.resize((max(w, round(img.size[0] * s)), max(h, round(img.size[1] * s))), Image.BILINEAR)
    left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
    arr = np.asarray(img.crop((left, top, left + w, top + h)), np.float32)
    if grey:
        arr, mean, std = arr[..., None], pp.mean[:1], pp.std[:1]
    else:
        arr, mean, std = arr[..., ::-1] if pp.bgr else arr, pp.mean, pp.std
    arr = (arr * pp.scale - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr if pp.layout == "NHWC" else arr.transpose(2, 0, 1), dtype=np.float32)


def _load_images(folder: Path, pp: ImagePreprocess) -> np.ndarray:
    files = image_files(folder)
    if not files:
        raise CalibrationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return np.stack([load_image(f, pp) for f in files])
