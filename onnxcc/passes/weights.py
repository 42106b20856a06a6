"""Replace initializer values in place of the same names (reconstructed weights)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import PassContractError
from .base import Pass, PassRecord, PassResult


@dataclass(frozen=True)
class ReplaceRecord(PassRecord):
    names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def changes(self) -> int:
        return len(self.names)


class ReplaceInitializersPass(Pass):
    """Sets initializers to new values of the same shape and dtype; the graph is untouched."""

    name = "ReplaceInitializers"

    def __init__(self, values: dict[str, np.ndarray]) -> None:
        self.values = values

    def call(self, model: onnx.ModelProto) -> PassResult:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        done = []
        for init in out.graph.initializer:
            if init.name in self.values:
                new = np.asarray(self.values[init.name])
                if tuple(new.shape) != tuple(init.dims):
                    raise PassContractError(f"{init.name}: shape {new.shape} != {tuple(init.dims)}")
                init.CopyFrom(onnx.numpy_helper.from_array(new.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)), init.name))
                done.append(init.name)
        missing = set(self.values) - set(done)
        if missing:
            raise PassContractError(f"no initializers named {sorted(missing)[:3]}")
        return PassResult(out, ReplaceRecord(self.name, tuple(done)))
