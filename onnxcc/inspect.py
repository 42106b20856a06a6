"""Load → normalize → analyse, packaged for ``onnxcc info`` and the Python API."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .analysis.costs import model_params
from .analysis.groups import Analysis, analyse
from .analysis.view import build_view, resolve_input_shapes
from .errors import UnsupportedModelError
from .io import load_model
from .ops import OPS
from .passes.base import PassRecord
from .passes.normalize import normalize


@dataclass
class Inspection:
    """A normalized model with its analysis at one input shape."""

    original: onnx.ModelProto
    model: onnx.ModelProto
    normalize_record: PassRecord
    analysis: Analysis

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.analysis.view.input_shapes

    def to_dict(self) -> dict[str, Any]:
        a = self.analysis
        return {
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "macs": int(a.total_macs),
            "compressible_macs": int(a.compressible_macs),
            "compressible_fraction": round(a.compressible_macs / a.total_macs, 4) if a.total_macs else 0.0,
            "params": int(model_params(self.model)),
            "layers": [layer_dict(a, layer) for layer in a.layers],
            "groups": [{"id": g.id, "channels": g.size, "prunable": g.prunable, "droppable": g.droppable, "origins": list(g.origins),
                        "members": len(g.members), "frozen": list(g.frozen)} for g in a.groups.values()],
            "normalize": self.normalize_record.to_dict(),
        }


def layer_dict(a: Analysis, layer) -> dict[str, Any]:
    return {
        "name": layer.name, "tensor": layer.key, "op": layer.op, "kernel": list(layer.kernel),
        "in_channels": layer.cin, "out_channels": layer.cout, "groups": layer.group,
        "macs": int(layer.macs), "params": int(layer.params),
        "out_groups": list(layer.out_groups), "in_groups": list(layer.in_groups),
        "prunable": layer.prunable, "factorizable": layer.factorizable,
        "why_not": "; ".join(layer.notes + _frozen_reasons(a, layer)),
    }


def _frozen_reasons(a: Analysis, layer) -> list[str]:
    if layer.prunable:
        return []
    return sorted({r for g in layer.out_groups + layer.in_groups for r in a.groups[g].frozen})[:2]


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantization ops of ``model`` (none for a float model)."""
    # by name in any domain: com.microsoft's QLinearConv is as quantized as the standard one
    return sorted({n.op_type for n in model.graph.node if OPS.get(n.op_type).quantized})


def is_quantized(model: onnx.ModelProto) -> bool:
    return bool(quantized_ops(model))


def inspect_model(model: onnx.ModelProto | str | os.PathLike,
                  input_shapes: dict[str | None, tuple[int, ...]] | None = None,
                  feeds: dict[str, np.ndarray] | None = None) -> Inspection:
    """Normalize ``model`` and analyse it at the (pinned) input shapes.

    The caller's model is not modified; ``Inspection.model`` is the normalized copy.
    """
    original = load_model(model) if not isinstance(model, onnx.ModelProto) else model
    result = normalize(original)
    shapes = resolve_input_shapes(result.model, input_shapes)
    view = build_view(result.model, shapes, feeds)
    if not view.nodes:
        raise UnsupportedModelError("the model has no nodes")
    return Inspection(original, result.model, result.record, analyse(view))
