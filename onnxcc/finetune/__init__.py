"""Fine-tune a compressed ONNX model against its original by knowledge distillation (needs torch).

Importing this package does not import torch; :mod:`onnxcc.finetune.executor` (the torch
executor, ``OnnxModule`` and ``export_weights``) does.
"""
from __future__ import annotations

from .train import finetune, finetune_verified, load_npz, run_finetune_cli

__all__ = ["finetune", "finetune_verified", "load_npz", "run_finetune_cli"]
