"""onnx-graphsurgeon round trip that keeps what gs would drop (metadata, opset list, IR version)."""
from __future__ import annotations

import hashlib
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
        self.made: dict[tuple, gs.Constant] = {}

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
    """A new initializer named after ``base`` — or the one already made from ``base`` with the
    same values: nodes that shared a weight (a Siamese branch) and change it alike keep sharing
    it, instead of each holding a copy."""
    values = np.ascontiguousarray(values)
    key = (base, values.dtype.str, values.shape, hashlib.sha1(values.tobytes()).digest())
    made = namer.made.get(key)
    if made is None or not np.array_equal(made.values, values):
        made = namer.made[key] = gs.Constant(namer(base), values)
    return made


def pad_spec(node: gs.Node, rank: int | None = None, const=None) -> tuple[list[int], list[int], float] | None:
    """(begin pads, end pads, value) per axis of a constant-mode Pad, or None when its amounts or
    value are not constants (``const`` reads a tensor's value; gs constants by default). The
    input's ``rank`` is needed only where an ``axes`` input names the padded axes."""
    const = const or (lambda t: np.asarray(t.values) if isinstance(t, gs.Constant) else None)
    if node.attrs.get("mode", "constant") != "constant":
        return None
    if "pads" in node.attrs:   # opset < 11
        pads, value = [int(p) for p in node.attrs["pads"]], float(node.attrs.get("value", 0.0))
    else:
        raw = const(node.inputs[1])
        if raw is None:
            return None
        pads, value = [int(v) for v in raw.reshape(-1)], 0.0
        if len(node.inputs) > 2 and node.inputs[2].name:
            v = const(node.inputs[2])
            if v is None:
                return None
            value = float(v.reshape(-1)[0]) if v.size else 0.0
        if len(node.inputs) > 3 and node.inputs[3].name:   # explicit axes (opset 18)
            axes = const(node.inputs[3])
            if axes is None or rank is None:
                return None
            full = [0] * (2 * rank)
            for i, a in enumerate(int(a) % rank for a in axes.reshape(-1)):
                full[a], full[rank + a] = pads[i], pads[len(pads) // 2 + i]
            pads = full
    half = len(pads) // 2
    if rank is not None and half != rank:
        return None
    return pads[:half], pads[half:], value
