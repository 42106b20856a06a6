"""Checkpoints of a fine-tuning run, one file replaced atomically after every epoch.

The file holds everything the next epoch depends on: weights, optimizer and schedule state, the
best epoch so far with its weights, torch's random state, the history, and a fingerprint of the
run's settings, models and data. onnxcc draws the batch order and the augmentation from the seed
and the epoch alone, so on the CPU a run resumed from epoch k ends with the weights of a run
that never stopped (on a GPU, to the precision its non-deterministic kernels allow).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import onnx
import torch

from ..errors import UsageError

FILE = "last.pt"


def fingerprint(student: onnx.ModelProto, teacher: onnx.ModelProto, samples: int, settings: dict[str, Any]) -> str:
    """What a resumed run must share with the one it continues."""
    h = hashlib.sha1(json.dumps([samples, settings], sort_keys=True, default=str).encode())
    for model in (student, teacher):
        for t in model.graph.initializer:
            h.update(t.name.encode() + str(list(t.dims)).encode())
        h.update(str(len(model.graph.node)).encode())
    return h.hexdigest()[:16]


class Checkpoints:
    """``folder/last.pt``: written by the main process, read by every process on resume."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / FILE

    def save(self, state: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            os.replace(tmp, self.path)  # a run killed while saving keeps the previous epoch's file
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"cannot write the checkpoint {self.path}: {e.strerror or e}") from None

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise UsageError(f"cannot read checkpoint {self.path} ({type(e).__name__}); delete it to start over") from None
        if state.get("fingerprint") != fingerprint:
            raise UsageError(f"checkpoint {self.path} is from a run with another model, data or settings; "
                             "delete it or use the same command")
        return state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # not empty: something else lives there
