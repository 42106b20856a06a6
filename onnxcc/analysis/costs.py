"""Multiply-accumulates and parameters, counted at the concrete (batch 1) runtime shapes.

MACs follow ptflops/fvcore/Torch-Pruning: only the weight layers count, each by the formula it
registers in the op registry here. Conv: |W| · Ho·Wo; ConvTranspose: |W| · Hi·Wi; Gemm/MatMul:
|Y| · K (one length-K dot product per output element).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ops import OPS
from .view import ModelView

Shape = tuple[int, ...]


@OPS.cost("Conv")
def _conv(node: gs.Node, x: Shape, w: Shape, y: Shape) -> int:
    return int(np.prod(w)) * int(np.prod(y[2:]))


@OPS.cost("ConvTranspose")
def _conv_transpose(node: gs.Node, x: Shape, w: Shape, y: Shape) -> int:
    return int(np.prod(w)) * int(np.prod(x[2:]))


@OPS.cost("Gemm", "MatMul")
def _dense(node: gs.Node, x: Shape, w: Shape, y: Shape) -> int:
    k = x[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else x[-1]
    return int(np.prod(y)) * int(k)


def node_macs(view: ModelView, node: gs.Node) -> int:
    cost = OPS.of(node).cost
    if cost is None:
        return 0
    x, w, y = (view.shape(t) for t in (node.inputs[0], node.inputs[1], node.outputs[0]))
    if x is None or w is None or y is None:
        return 0
    return cost(node, x, w, y)


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
