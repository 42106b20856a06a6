"""onnxcc: Collaborative Compression (joint channel pruning + low-rank factorization) of CNNs,
directly on their ONNX graphs.

The three jobs are functions here: :func:`compress` (search, rewrite, recover, verify),
:func:`finetune` (distil the original into a compressed model in torch) and :func:`bench`
(interleaved onnxruntime latency); the passes compose the rewrite by hand.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .benchmark import benchmark as bench  # noqa: E402
from .compression import CompressResult, compress  # noqa: E402
from .config import CompressConfig, FinetuneConfig  # noqa: E402
from .errors import OnnxccError  # noqa: E402
from .finetuning.train import finetune  # noqa: E402
from .inspect import Inspection, inspect_model  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .passes.factorize import FactorizeConvPass  # noqa: E402
from .passes.normalize import normalize  # noqa: E402
from .passes.prune import PruneChannelsPass  # noqa: E402

__all__ = ["bench", "compress", "finetune", "CompressConfig", "CompressResult", "FinetuneConfig", "OnnxccError",
           "Inspection", "inspect_model", "load_model", "save_model", "FactorizeConvPass", "PruneChannelsPass",
           "normalize", "__version__"]
