"""onnxcc: Collaborative Compression (joint channel pruning + low-rank factorization) of CNNs,
directly on their ONNX graphs."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import OnnxccError  # noqa: E402
from .inspect import Inspection, inspect_model  # noqa: E402
from .io import load_model, save_model  # noqa: E402
from .passes.factorize import FactorizeConvPass  # noqa: E402
from .passes.normalize import normalize  # noqa: E402
from .passes.prune import PruneChannelsPass  # noqa: E402

__all__ = ["OnnxccError", "Inspection", "inspect_model", "load_model", "save_model",
           "FactorizeConvPass", "PruneChannelsPass", "normalize", "__version__"]
