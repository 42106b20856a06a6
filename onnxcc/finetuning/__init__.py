"""Fine-tune a compressed ONNX model against its original by knowledge distillation (needs torch).

Importing this package does not import torch; :mod:`onnxcc.finetuning.executor` (the torch
executor, ``OnnxModule`` and ``export_weights``) does.
"""
from __future__ import annotations

from .data import load_npz, open_samples
from .train import check_trainable, checkpoint_folder, finetune, finetune_verified, run_finetune_cli

__all__ = ["check_trainable", "checkpoint_folder", "finetune", "finetune_verified", "load_npz", "open_samples",
           "run_finetune_cli"]
