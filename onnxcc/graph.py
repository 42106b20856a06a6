"""onnx-graphsurgeon round trip that keeps what gs would drop (metadata, opset list, IR version)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.severity = G_LOGGER.ERROR  # its folding chatter belongs to debug logs, not users


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(model)
    graph.toposort()
    return graph


def export_model(graph: gs.Graph, like: onnx.ModelProto, clear_shapes: bool = True) -> onnx.ModelProto:
    """Export ``graph`` with ``like``'s model-level fields; intermediate shapes are dropped when
    a rewrite may have made them stale (onnxruntime re-infers them)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if clear_shapes:
        keep = {t.name for t in graph.inputs + graph.outputs}
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and t.name not in keep:
                t.shape = None
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    model.ir_version = like.ir_version
    if model.ir_version < 4:  # IR 3 requires every initializer to be listed as a graph input
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer if t.name not in listed)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(like, field))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


class Namer:
    """Fresh tensor/node names that do not collide with anything in the graph."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        self.counter = itertools.count()

    def __call__(self, base: str) -> str:
        name = base
        while name in self.used:
            name = f"{base}_{next(self.counter)}"
        self.used.add(name)
        return name


def set_inputs(node: gs.Node, tensors: list[gs.Tensor]) -> None:
    """Replace all inputs (gs lists do not support slice assignment)."""
    node.inputs.clear()
    node.inputs.extend(tensors)


def constant(namer: Namer, base: str, values: np.ndarray) -> gs.Constant:
    return gs.Constant(namer(base), np.ascontiguousarray(values))
