"""Multiply-accumulates and parameters, counted at the concrete (batch 1) runtime shapes.

MACs follow ptflops/fvcore/Torch-Pruning: only Conv, ConvTranspose, Gemm and MatMul count.
Conv: |W| · Ho·Wo; ConvTranspose: |W| · Hi·Wi; Gemm/MatMul: |Y| · K (one length-K dot product
per output element).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .view import ModelView

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def node_macs(view: ModelView, node: gs.Node) -> int:
    if node.op not in LAYER_OPS:
        return 0
    x, w, y = (view.shape(t) for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if x is None or w is None or y is None:
        return 0
    if node.op == "Conv":
        return int(np.prod(w)) * int(np.prod(y[2:]))
    if node.op == "ConvTranspose":
        return int(np.prod(w)) * int(np.prod(x[2:]))
    k = x[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else x[-1]
    return int(np.prod(y)) * int(k)


def node_params(node: gs.Node) -> int:
    return int(sum(np.prod(t.shape) for t in node.inputs if isinstance(t, gs.Constant)))


def model_params(model: onnx.ModelProto) -> int:
    """Every stored weight: initializers plus Constant-node payloads (as Paddle exports keep them)."""
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    total += int(np.prod(a.t.dims))
    return total
