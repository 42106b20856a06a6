"""Gradient-free recovery: per-channel statistics of each layer's output moved back to the original's.

After channels or rank are removed, a layer's output drifts: its mean (what the removed channels
contributed on average) and its spread. Each Conv/Gemm whose output tensor the original also has
gets its bias — and, in ``affine`` mode, its output rows' scale — corrected so that every kept
channel's mean (and standard deviation) on calibration data matches the original's, as adaptive
BatchNorm re-estimation does for pruned networks with BatchNorm. The corrections of all layers are
estimated together and re-estimated a few times, since correcting a layer moves what the layers
after it see. Only initializer values change. The mode that does least damage on held-back
samples is kept, and none when neither helps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ..runtime import expose_outputs, make_session
from .blocks import Liveness
from .channels import ChannelMap
from .judge import OutputJudge, batch_size, run_batched
from .shared import SharedValues

log = logging.getLogger(__name__)

MODES = ("mean", "affine")
MAX_SCALE = 2.0   # a channel's spread is never changed by more than this factor


@dataclass(frozen=True)
class _Layer:
    output: str
    weight: str
    bias: str
    axis: int          # channel axis of the output
    row_axis: int      # axis of the weight that holds the output channels
    bias_scale: float  # Gemm's beta


def _layers(model: onnx.ModelProto, comparable: set[str]) -> list[_Layer]:
    inits = {i.name: i for i in model.graph.initializer}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.output[0] not in comparable:
            continue
        w, b = n.input[1], n.input[2]
        # a weight shared with other nodes would change theirs too
        if w not in inits or b not in inits or uses[w] > 1 or uses[b] > 1:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            layer = _Layer(n.output[0], w, b, 1, 0, 1.0)
        elif not attrs.get("transA", 0) and attrs.get("beta", 1.0) != 0:
            layer = _Layer(n.output[0], w, b, -1, 0 if attrs.get("transB", 0) else 1, float(attrs.get("beta", 1.0)))
        else:
            continue
        if int(np.prod(inits[b].dims)) == inits[w].dims[layer.row_axis]:   # one bias per output channel
            out.append(layer)
    return out


def channel_moments(model: onnx.ModelProto, names: list[str], axes: list[int], feeds: Mapping[str, np.ndarray],
                    provider: str = "cpu", kept: ChannelMap | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and standard deviation of each named tensor over ``feeds``, streamed in
    batches (nothing of the size of the activations is kept); aligned to ``kept`` channels."""
    sess = make_session(expose_outputs(model, names), provider)
    n = len(next(iter(feeds.values())))
    step = batch_size(model)
    sums: list[list[np.ndarray]] = [[0.0, 0.0, 0] for _ in names]
    for i in range(0, n, step):
        outs = sess.run(names, {k: v[i:i + step] for k, v in feeds.items()})
        for acc, name, ax, y in zip(sums, names, axes, outs):
            if kept and name in kept:
                y = kept[name].take(y)
            y = np.moveaxis(np.asarray(y, np.float64), ax, 1)
            y = y.reshape(y.shape[0], y.shape[1], -1)
            acc[0] = acc[0] + y.sum((0, 2))
            acc[1] = acc[1] + (y ** 2).sum((0, 2))
            acc[2] += y.shape[0] * y.shape[2]
    res = []
    for s, s2, count in sums:
        mu = s / count
        res.append((mu, np.sqrt(np.maximum(s2 / count - mu ** 2, 0.0))))
    return res


def _apply(model: onnx.ModelProto, layers: list[_Layer], fixes: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` whose layers compute ``scale · y + shift`` per output channel."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    for layer, (scale, shift) in zip(layers, fixes):
        W = numpy_helper.to_array(inits[layer.weight])
        b = numpy_helper.to_array(inits[layer.bias])
        shape = [1] * W.ndim
        shape[layer.row_axis] = -1
        W2 = (W * scale.reshape(shape)).astype(W.dtype)
        b2 = ((b * layer.bias_scale * scale.reshape(b.shape) + shift.reshape(b.shape)) / layer.bias_scale).astype(b.dtype)
        inits[layer.weight].CopyFrom(numpy_helper.from_array(W2, layer.weight))
        inits[layer.bias].CopyFrom(numpy_helper.from_array(b2, layer.bias))
    return out


def _segment(model: onnx.ModelProto, start: int, end: int, inputs: list[str], outputs: list[str],
             like: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Nodes ``start..end-1`` of ``model`` as a model of their own, from ``inputs`` to ``outputs``
    (``like``: a value of each input, for its type)."""
    g = model.graph
    nodes = list(g.node[start:end])
    used = {i for n in nodes for i in n.input}
    consts = [n for n in g.node[:start] if n.op_type == "Constant" and used.intersection(n.output)]
    graph = onnx.helper.make_graph(
        consts + nodes, "segment",
        [onnx.helper.make_tensor_value_info(t, onnx.helper.np_dtype_to_tensor_dtype(like[t].dtype), None) for t in inputs],
        [onnx.helper.make_empty_tensor_value_info(t) for t in outputs],
        [i for i in g.initializer if i.name in used])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _moments(y: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.moveaxis(np.asarray(y, np.float64), axis, 1)
    y = y.reshape(y.shape[0], y.shape[1], -1)
    return y.mean((0, 2)), y.std((0, 2))


def correct(student: onnx.ModelProto, teacher: onnx.ModelProto, comparable: set[str], kept: ChannelMap,
            feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray], shared: SharedValues, mode: str,
            provider: str = "cpu") -> tuple[onnx.ModelProto, int]:
    """``student`` with its layers' output statistics moved to the original's (``mode``: mean or
    affine); the number of layers corrected.

    The layers are corrected in graph order, each seeing the corrections before it (estimated
    together, the corrections of a deep network feed on each other and diverge): the graph runs
    once, segment by segment, each layer's output corrected in place before the next segment
    reads it. ``like``: one value of every activation of ``student``; ``shared``: its tensors
    without a sample axis, fed to each segment for the size of the batch."""
    layers = _layers(student, comparable)
    if not layers:
        return student, 0
    target = channel_moments(teacher, [l.output for l in layers], [l.axis for l in layers], feeds, provider, kept)
    inits = {i.name: i for i in student.graph.initializer}
    at = {o: k for k, n in enumerate(student.graph.node) for o in n.output}
    live = Liveness(student)
    values = {k: np.asarray(v) for k, v in feeds.items()}
    order = sorted((at[l.output], l, t) for l, t in zip(layers, target)
                   if t[0].size == inits[l.weight].dims[l.row_axis] and l.output in live.crossing(at[l.output]))
    done, fixes, prev, batch = [], [], -1, batch_size(student)
    for cut, layer, (mt, st) in order:
        after = [t for t in live.crossing(cut) if t not in shared]
        made = [t for t in after if t not in values]
        given = [t for t in live.crossing(prev) if t in values or t in shared]
        sess = make_session(_segment(student, prev + 1, cut + 1, given, made, like), provider)
        outs = run_batched(sess, made, {t: values[t] for t in given if t in values}, batch, shared)
        values = {t: values[t] if t in values else outs[made.index(t)] for t in after}
        ms, ss = _moments(values[layer.output], layer.axis)
        a = np.ones_like(mt)
        if mode == "affine":
            live_ch = (ss > 1e-6 * (st.mean() + 1e-12)) & (st > 0)
            a[live_ch] = np.clip(st[live_ch] / ss[live_ch], 1 / MAX_SCALE, MAX_SCALE)
        shift = mt - a * ms
        shape = [1] * values[layer.output].ndim
        shape[layer.axis] = -1
        y = values[layer.output]
        values[layer.output] = (y * a.reshape(shape) + shift.reshape(shape)).astype(y.dtype)
        done.append(layer)
        fixes.append((a, shift))
        prev = cut
    return _apply(student, done, fixes), len(done)


def recover_statistics(student: onnx.ModelProto, teacher: onnx.ModelProto, comparable: set[str],
                       kept: ChannelMap, feeds: Mapping[str, np.ndarray], like: Mapping[str, np.ndarray],
                       shared: SharedValues, judge: OutputJudge,
                       provider: str = "cpu") -> tuple[onnx.ModelProto, dict]:
    """The least-damage of: no correction, mean correction, affine correction (on ``judge``'s
    held-back samples)."""
    best, record = student, {"mode": "none", "damage": {"none": judge.damage(student)}, "layers": 0}
    for mode in MODES:
        model, layers = correct(student, teacher, comparable, kept, feeds, like, shared, mode, provider)
        if not layers:
            break
        d = judge.damage(model)
        record["damage"][mode] = d
        log.info("statistics correction (%s) of %d layers: held-back damage %.4g", mode, layers, d)
        if d < record["damage"][record["mode"]]:
            best, record["mode"], record["layers"] = model, mode, layers
    return best, record
