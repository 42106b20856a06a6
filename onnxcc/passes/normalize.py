"""Normalization: bring any exporter's graph into the one form the analysis expects.

- ``LiftConstantsPass``: ``Constant`` nodes (Paddle keeps weights there) become initializers.
- ``RemoveIdentityPass``: ``Identity`` and inference ``Dropout`` disappear.
- ``FoldConstantsPass``: subgraphs that depend only on constants are evaluated once (tf2onnx
  transposes weights, Paddle casts them); shape computations on activations are left alone so a
  dynamic batch dimension survives.
- ``FoldBatchNormPass``: ``BatchNormalization(Conv(x))`` → ``Conv'(x)`` with
  ``W' = W · s``, ``b' = (b − μ) · s + β`` and ``s = γ / √(σ² + ε)`` per output channel
  (ConvTranspose scales axis 1 of its weight, Gemm the output features); the same for ``Mul``,
  ``Div``, ``Add`` and ``Sub`` by a per-channel (or scalar) constant.
- ``FusePadIntoConvPass``: a zero ``Pad`` on spatial axes only (TF "same" padding) merges into
  the following Convs' ``pads``.
- ``NameNodesPass``: unnamed and repeated node names become unique ones.

Each is exact up to float rounding; ``normalize()`` runs them in that order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..graph import Namer, constant, export_model, import_graph, pad_spec, set_inputs
from ..ops import OPS
from .base import Pass, PassRecord, PassResult, Sequence, SequenceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CountRecord(PassRecord):
    count: int = 0
    skipped: tuple[str, ...] = ()

    @property
    def changes(self) -> int:
        return self.count


def _result(graph: gs.Graph, model: onnx.ModelProto, record: CountRecord) -> PassResult:
    """Export only when something changed: re-serializing big weights is the costly part."""
    if not record.count:
        return PassResult(model, record)
    return PassResult(export_model(graph, model, clear_shapes=False), record)


class LiftConstantsPass(Pass):
    """Replaces Constant nodes with initializers of the same name."""

    name = "LiftConstants"

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        count = 0
        for node in graph.nodes:
            if node.op != "Constant" or node.outputs[0] in graph.outputs:
                continue
            out = node.outputs[0]
            attr = next(iter(node.attrs.items()), (None, None))
            values = _constant_value(*attr)
            if values is None:
                log.debug("LiftConstants: skipped %s (attribute %s)", node.name, attr[0])
                continue
            out.to_constant(values)
            node.outputs.clear()
            count += 1
        return _result(graph, model, CountRecord(self.name, count))


def _constant_value(name: str | None, value) -> np.ndarray | None:
    if name == "value":
        return np.asarray(value.values)
    if name in ("value_float", "value_int"):
        return np.asarray(value, np.float32 if name == "value_float" else np.int64)
    if name in ("value_floats", "value_ints"):
        return np.asarray(list(value), np.float32 if name == "value_floats" else np.int64)
    return None


class RemoveIdentityPass(Pass):
    """Removes Identity and inference-mode Dropout by wiring consumers to their input."""

    name = "RemoveIdentity"

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        count = 0
        for node in graph.nodes:
            if not OPS.of(node).identity:
                continue
            if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
                continue
            src, out = node.inputs[0], node.outputs[0]
            if out in graph.outputs:
                continue  # the output name is part of the model's interface
            for consumer in list(out.outputs):
                set_inputs(consumer, [src if t is out else t for t in consumer.inputs])
            node.outputs.clear()
            count += 1
        return _result(graph, model, CountRecord(self.name, count))


class FoldConstantsPass(Pass):
    """Evaluates constant-only subgraphs with onnxruntime (via onnx-graphsurgeon)."""

    name = "FoldConstants"

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        before = len(graph.nodes)
        try:
            graph.fold_constants(fold_shapes=False, error_ok=False)
        except Exception as e:  # noqa: BLE001 - folding is an optimisation; keep the graph as is
            log.warning("constant folding skipped: %s", str(e).splitlines()[0][:200])
            return PassResult(model, CountRecord(self.name, 0, (str(e).splitlines()[0][:200],)))
        graph.cleanup()
        return _result(graph, model, CountRecord(self.name, before - len(graph.nodes)))


class FoldBatchNormPass(Pass):
    """Folds a per-channel affine map of a Conv's, ConvTranspose's or Gemm's output into the layer:
    BatchNormalization, and Mul/Div/Add/Sub by a constant that varies along the channel axis only
    (exporters without BatchNorm, e.g. a TF/Keras net's scale-and-shift layers, or BN already
    folded into ``x · s + b``). Repeated, so ``Mul`` then ``Add`` both fold."""

    name = "FoldBatchNorm"

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        namer = Namer(graph)
        count, skipped = 0, []
        changed = True
        while changed:
            changed = False
            for node in graph.nodes:
                extract = OPS.of(node).affine
                if extract is None or not node.inputs or not node.outputs:
                    continue
                affine = extract(node, graph)
                why = affine if isinstance(affine, str) else self._check(graph, node)
                if why:
                    if node.op == "BatchNormalization":
                        skipped.append(f"{node.name}: {why}")
                        log.debug("FoldBatchNorm: skipped %s: %s", node.name, why)
                    continue
                self._fold(node, *affine, namer)
                count += 1
                changed = True
            graph.cleanup()
        return _result(graph, model, CountRecord(self.name, count, tuple(skipped)))

    @staticmethod
    def _check(graph: gs.Graph, node: gs.Node) -> str:
        if not node.inputs[0].inputs:
            return "on a graph input"
        prod = node.inputs[0].inputs[0]
        if OPS.of(prod).fold_axis is None:
            return f"preceded by {prod.op}"
        if len(node.inputs[0].outputs) != 1 or node.inputs[0] in graph.outputs:
            return "producer output has other consumers"
        if not all(isinstance(t, gs.Constant) for t in prod.inputs[1:3] if t.name):
            return "producer weights are not constant"
        if any(len(t.outputs) > 1 for t in prod.inputs[1:3] if t.name):
            return "producer weights are shared with other nodes (folding would copy them)"
        if prod.op == "Gemm" and (prod.attrs.get("transA", 0) or prod.attrs.get("alpha", 1.0) != 1.0
                                  or prod.attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta"
        if prod.op == "ConvTranspose" and prod.attrs.get("group", 1) != 1:
            return "grouped ConvTranspose"
        return ""

    @staticmethod
    def _fold(node: gs.Node, scale: np.ndarray, shift: np.ndarray, namer: Namer) -> None:
        """The producer computes ``y · scale + shift`` per output channel instead of ``y``."""
        prod = node.inputs[0].inputs[0]
        W = np.asarray(prod.inputs[1].values)
        axis = OPS.of(prod).fold_axis
        if prod.op == "Gemm" and prod.attrs.get("transB", 0):
            axis = 1 - axis
        channels = W.shape[axis] * (prod.attrs.get("group", 1) if prod.op == "ConvTranspose" else 1)
        scale, shift = np.broadcast_to(scale, (channels,)), np.broadcast_to(shift, (channels,))
        shape = [1] * W.ndim
        shape[axis] = -1
        new_w = (W.astype(np.float64) * scale.reshape(shape)).astype(W.dtype)
        has_bias = len(prod.inputs) > 2 and prod.inputs[2].name
        b = np.asarray(prod.inputs[2].values, np.float64).reshape(-1) if has_bias else np.zeros(channels)
        new_b = (np.broadcast_to(b, (channels,)) * scale + shift).astype(W.dtype)
        w_t = constant(namer, prod.inputs[1].name + "_bnfold", new_w)
        b_t = constant(namer, (prod.inputs[2].name if has_bias else prod.outputs[0].name) + "_bnfold", new_b)
        set_inputs(prod, [prod.inputs[0], w_t, b_t])
        out = node.outputs[0]
        node.outputs.clear()
        prod.outputs[0] = out


@OPS.affine("BatchNormalization")
def _batchnorm(node: gs.Node, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray] | str:
    if any(o.outputs for o in node.outputs[1:]) or node.attrs.get("training_mode", 0):
        return "training-mode BatchNormalization"
    if not all(isinstance(t, gs.Constant) for t in node.inputs[1:5]):
        return "statistics are not constant"
    gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in node.inputs[1:5])
    scale = gamma / np.sqrt(var + node.attrs.get("epsilon", 1e-5))
    return scale, beta - mean * scale


def _per_channel(node: gs.Node, graph: gs.Graph) -> np.ndarray | str:
    """The constant operand of a binary op on a layer output, as a vector over its channels
    (length 1: the same for all); a reason where it is not constant along the other axes."""
    if len(node.inputs) != 2:
        return "not a binary op"
    if node.op in ("Mul", "Add") and isinstance(node.inputs[0], gs.Constant):
        set_inputs(node, node.inputs[::-1])   # commutative: the layer output first
    if not isinstance(node.inputs[1], gs.Constant) or not node.inputs[0].inputs:
        return "operand is not a constant"
    c = np.asarray(node.inputs[1].values, np.float64)
    prod = node.inputs[0].inputs[0]
    if OPS.of(prod).fold_axis is None or not isinstance(prod.inputs[1], gs.Constant):
        return f"preceded by {prod.op}"
    rank = 2 if prod.op == "Gemm" else np.asarray(prod.inputs[1].values).ndim   # a Conv's output has its weight's rank
    axis = rank - 1 if prod.op == "Gemm" else 1
    if c.ndim > rank:
        return "broadcasts beyond the layer output"
    full = c.reshape((1,) * (rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis):
        return "not per-channel"
    return full.reshape(-1)


@OPS.affine("Mul", "Div")
def _scale_by(node: gs.Node, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray] | str:
    c = _per_channel(node, graph)
    if isinstance(c, str):
        return c
    if node.op == "Div" and not np.all(c):
        return "division by zero"
    return (1 / c if node.op == "Div" else c), np.zeros(1)


@OPS.affine("Add", "Sub")
def _shift_by(node: gs.Node, graph: gs.Graph) -> tuple[np.ndarray, np.ndarray] | str:
    c = _per_channel(node, graph)
    return c if isinstance(c, str) else (np.ones(1), -c if node.op == "Sub" else c)



class FusePadIntoConvPass(Pass):
    """Merges constant-zero spatial Pad nodes into the pads of the Convs that consume them."""

    name = "FusePadIntoConv"

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        count = 0
        for pad in graph.nodes:
            if pad.op != "Pad":
                continue
            pads = self._spatial_pads(pad)
            consumers = pad.outputs[0].outputs
            if pads is None or not consumers or pad.outputs[0] in graph.outputs:
                continue
            if not all(c.op == "Conv" and c.inputs[0] is pad.outputs[0]
                       and c.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") for c in consumers):
                continue
            for conv in list(consumers):
                k = len(pads) // 2
                old = list(conv.attrs.get("pads", [0] * (2 * k))) if conv.attrs.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * k)
                conv.attrs["pads"] = [int(a + b) for a, b in zip(old, pads)]
                conv.attrs.pop("auto_pad", None)
                conv.inputs[0] = pad.inputs[0]
            count += 1
        return _result(graph, model, CountRecord(self.name, count))

    @staticmethod
    def _spatial_pads(pad: gs.Node) -> list[int] | None:
        """The spatial [begin..., end...] pads of a zero constant Pad, or None."""
        shape = pad.inputs[0].shape
        spec = pad_spec(pad, len(shape) if shape is not None else None)
        if spec is None:
            return None
        begin, end, value = spec
        if value != 0.0 or len(begin) < 3 or any(p < 0 for p in begin + end):
            return None
        if begin[:2] != [0, 0] or end[:2] != [0, 0]:
            return None
        return begin[2:] + end[2:]


class NameNodesPass(Pass):
    """Every node gets a name of its own (exporters leave many empty, some repeat them): the
    report and the records name layers by them."""

    name = "NameNodes"

    def call(self, model: onnx.ModelProto) -> PassResult:
        names = [n.name for n in model.graph.node]
        if all(names) and len(set(names)) == len(names):
            return PassResult(model, CountRecord(self.name, 0))
        graph = import_graph(model)
        namer = Namer(graph)   # avoids every node and tensor name: a repeated name is taken already
        seen: set[str] = set()
        count = 0
        for node in graph.nodes:
            if not node.name or node.name in seen:
                node.name = namer(f"{node.op}_{node.outputs[0].name}" if node.outputs else node.op)
                count += 1
            seen.add(node.name)
        return _result(graph, model, CountRecord(self.name, count))


def normalize_passes() -> Sequence:
    return Sequence(LiftConstantsPass(), RemoveIdentityPass(), FoldConstantsPass(),
                    FoldBatchNormPass(), FusePadIntoConvPass(), NameNodesPass(), name="Normalize")


def normalize(model: onnx.ModelProto) -> PassResult:
    """Run the whole normalization; the result's record is a SequenceRecord."""
    return normalize_passes()(model)


__all__ = ["LiftConstantsPass", "RemoveIdentityPass", "FoldConstantsPass", "FoldBatchNormPass",
           "FusePadIntoConvPass", "NameNodesPass", "normalize", "normalize_passes", "SequenceRecord"]
