"""Physical channel removal: every member of a group loses the same channels at once.

``PruneChannelsPass(analysis, keep)`` takes, per channel group, a boolean mask of the channels
to keep and slices every parameter that depends on them — producer weight rows and biases,
consumer weight columns, BatchNorm statistics, per-channel constants (PRelu slopes,
squeeze-excite scales), Split sizes, Slice bounds, Reshape and Resize targets. No Gather is
ever inserted: the producers stop computing what nobody reads.

The handlers below are registered in the op registry, one per op whose parameters depend on the
channel count (its channel rule says so); the pass refuses to run if such an op has no handler.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..analysis.groups import Analysis
from ..analysis.op_rules import slice_params
from ..errors import PassContractError
from ..graph import Namer, constant, export_model, import_graph, set_inputs
from ..ops import OPS
from .base import Pass, PassRecord, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneRecord(PassRecord):
    groups: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (before, after)
    macs_before: int = 0
    macs_after: int = 0
    nodes_touched: int = 0

    @property
    def channels_removed(self) -> int:
        return sum(b - a for b, a in self.groups.values())

    @property
    def changes(self) -> int:
        return self.channels_removed


@dataclass
class PruneContext:
    analysis: Analysis
    keep: dict[int, np.ndarray]
    graph: gs.Graph
    namer: Namer

    def mask(self, t: gs.Tensor) -> np.ndarray | None:
        m = self.analysis.mask(t.name, self.keep)
        return None if m is None or m.all() else m

    def layout_axis(self, t: gs.Tensor) -> int | None:
        lay = self.analysis.layout(t.name)
        return None if lay is None else lay.axis

    def replace_const(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give ``node`` its own sliced copy: the original may be shared with other nodes."""
        old = node.inputs[index]
        node.inputs[index] = constant(self.namer, old.name, values.astype(np.asarray(old.values).dtype))


def _take(arr: np.ndarray, mask: np.ndarray | None, axis: int) -> np.ndarray:
    return arr if mask is None else np.compress(mask, arr, axis=axis)


def _const(node: gs.Node, i: int) -> np.ndarray | None:
    if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant):
        return np.asarray(node.inputs[i].values)
    return None


@OPS.prune("Conv", "ConvTranspose")
def prune_conv(ctx: PruneContext, node: gs.Node) -> None:
    out_m, in_m = ctx.mask(node.outputs[0]), ctx.mask(node.inputs[0])
    W = _const(node, 1)
    group = node.attrs.get("group", 1)
    if node.op == "Conv" and group > 1:  # depthwise: rule guaranteed in == out channels
        if out_m is None:
            return
        node.attrs["group"] = int(out_m.sum())
        ctx.replace_const(node, 1, _take(W, out_m, 0))
    else:
        out_axis, in_axis = (0, 1) if node.op == "Conv" else (1, 0)
        if out_m is None and in_m is None:
            return
        ctx.replace_const(node, 1, _take(_take(W, out_m, out_axis), in_m, in_axis))
    bias = _const(node, 2)
    if bias is not None and out_m is not None:
        ctx.replace_const(node, 2, _take(bias, out_m, 0))


@OPS.prune("Gemm")
def prune_gemm(ctx: PruneContext, node: gs.Node) -> None:
    out_m, in_m = ctx.mask(node.outputs[0]), ctx.mask(node.inputs[0])
    if out_m is None and in_m is None:
        return
    B = _const(node, 1)
    k_axis, n_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
    ctx.replace_const(node, 1, _take(_take(B, out_m, n_axis), in_m, k_axis))
    C = _const(node, 2)
    if C is not None and out_m is not None and C.ndim and C.shape[-1] > 1:
        ctx.replace_const(node, 2, _take(C, out_m, C.ndim - 1))


@OPS.prune("MatMul")
def prune_matmul(ctx: PruneContext, node: gs.Node) -> None:
    B = _const(node, 1)
    if B is None:
        return
    a_axis = ctx.layout_axis(node.inputs[0])
    rank_a = len(ctx.analysis.view.shape(node.inputs[0]))
    if a_axis is not None and a_axis != rank_a - 1:
        return  # channels ride along an outer axis; B only mixes the last one
    in_m = ctx.mask(node.inputs[0]) if a_axis is not None else None
    out_m = ctx.mask(node.outputs[0])
    if in_m is None and out_m is None:
        return
    ctx.replace_const(node, 1, _take(_take(B, out_m, 1), in_m, 0))


@OPS.prune("BatchNormalization", "InstanceNormalization")
def prune_norm(ctx: PruneContext, node: gs.Node) -> None:
    m = ctx.mask(node.inputs[0])
    if m is None:
        return
    for i in range(1, len(node.inputs)):
        v = _const(node, i)
        if v is not None:
            ctx.replace_const(node, i, _take(v, m, 0))


@OPS.prune(*OPS.family("elementwise"))
def prune_elementwise(ctx: PruneContext, node: gs.Node) -> None:
    out = node.outputs[0]
    axis, m = ctx.layout_axis(out), ctx.mask(out)
    if m is None:
        return
    rank = len(ctx.analysis.view.shape(out))
    for i, t in enumerate(node.inputs):
        v = _const(node, i)
        if v is None:
            continue
        a = axis - (rank - v.ndim)
        if a >= 0 and v.shape[a] > 1:
            ctx.replace_const(node, i, _take(v, m, a))


@OPS.prune("Split")
def prune_split(ctx: PruneContext, node: gs.Node) -> None:
    x = node.inputs[0]
    rank = len(ctx.analysis.view.shape(x))
    axis = node.attrs.get("axis", 0)
    axis = axis + rank if axis < 0 else axis
    if ctx.layout_axis(x) != axis or ctx.mask(x) is None:
        return
    sizes = np.array([int(ctx.analysis.mask(o.name, ctx.keep).sum()) for o in node.outputs], np.int64)
    if ctx.graph.opset >= 13:
        node.attrs.pop("num_outputs", None)
        split_t = constant(ctx.namer, (node.name or "split") + "_sizes", sizes)
        set_inputs(node, [node.inputs[0], split_t])
    else:
        node.attrs["split"] = [int(s) for s in sizes]


@OPS.prune("Slice")
def prune_slice(ctx: PruneContext, node: gs.Node) -> None:
    x = node.inputs[0]
    axis, m = ctx.layout_axis(x), ctx.analysis.mask(x.name, ctx.keep)
    if m is None or m.all():
        return
    view = ctx.analysis.view
    si, so = view.shape(x), view.shape(node.outputs[0])
    if si[axis] == so[axis]:
        return
    starts, ends, axes, _ = slice_params(view, node)
    rank = len(si)
    k = next(i for i, a in enumerate(axes) if (int(a) + rank if int(a) < 0 else int(a)) == axis)
    start, stop, _ = slice(int(starts[k]), int(ends[k])).indices(si[axis])
    starts[k], ends[k] = int(m[:start].sum()), int(m[:stop].sum())
    if "starts" in node.attrs:
        node.attrs["starts"], node.attrs["ends"] = [int(s) for s in starts], [int(e) for e in ends]
    else:
        dtype = np.asarray(node.inputs[1].values).dtype
        node.inputs[1] = constant(ctx.namer, node.inputs[1].name, np.array(starts, dtype))
        node.inputs[2] = constant(ctx.namer, node.inputs[2].name, np.array(ends, dtype))


@OPS.prune("Reshape")
def prune_reshape(ctx: PruneContext, node: gs.Node) -> None:
    out = node.outputs[0]
    target = _const(node, 1)
    m = ctx.mask(out)
    if target is None or m is None:
        return
    axis = ctx.layout_axis(out)
    if target[axis] > 0:
        new = target.copy()
        new[axis] = int(m.sum())
        ctx.replace_const(node, 1, new)


@OPS.prune("Resize", "Upsample", "Pad")
def prune_resize(ctx: PruneContext, node: gs.Node) -> None:
    """Only an explicit ``sizes`` vector names the channel count; scales and pads do not."""
    if node.op != "Resize" or len(node.inputs) < 4:
        return
    sizes, m = _const(node, 3), ctx.mask(node.outputs[0])
    if sizes is None or m is None:
        return
    new = sizes.copy()
    new[ctx.layout_axis(node.outputs[0])] = int(m.sum())
    ctx.replace_const(node, 3, new)


class PruneChannelsPass(Pass):
    """Removes the channels ``keep`` marks False from every member of their group."""

    name = "PruneChannels"

    def __init__(self, analysis: Analysis, keep: dict[int, np.ndarray]) -> None:
        missing = [spec.name for spec in OPS if spec.channel_params and spec.prune is None]
        if missing:
            raise PassContractError(f"ops with channel parameters but no prune handler: {sorted(missing)}")
        for gid, m in keep.items():
            g = analysis.groups.get(gid)
            if g is None:
                raise PassContractError(f"unknown channel group {gid}")
            if len(m) != g.size:
                raise PassContractError(f"group {gid}: mask of {len(m)} for {g.size} channels")
            if not m.all() and not g.prunable:
                raise PassContractError(f"group {gid} is frozen: {'; '.join(g.frozen)}")
            if not m.any() and not g.droppable:
                raise PassContractError(f"group {gid} would lose all its channels and the graph cannot "
                                        "fold what reads it")
        self.analysis = analysis
        self.keep = {gid: np.asarray(m, bool) for gid, m in keep.items() if not np.all(m)}

    def requires(self, model: onnx.ModelProto) -> None:
        analysed = [o for n in self.analysis.view.model.graph.node for o in n.output]
        if [o for n in model.graph.node for o in n.output] != analysed:
            raise PassContractError("PruneChannelsPass applied to a model other than the one analysed")

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        ctx = PruneContext(self.analysis, self.keep, graph, Namer(graph))
        touched = 0
        if self.keep:
            for node in list(graph.nodes):
                handler = OPS.of(node).prune
                if handler is not None:
                    before = [t.name for t in node.inputs]
                    handler(ctx, node)
                    touched += before != [t.name for t in node.inputs] or node.op == "Split"
        kept = {gid: int(m.sum()) for gid, m in self.keep.items()}
        _fold_emptied(graph, self.analysis, kept, ctx.namer)
        record = PruneRecord(
            self.name,
            groups={gid: (self.analysis.groups[gid].size, n) for gid, n in kept.items()},
            macs_before=self.analysis.total_macs, macs_after=self.analysis.macs(kept),
            nodes_touched=int(touched))
        out = export_model(graph, model, clear_shapes=True) if self.keep else model
        return PassResult(out, record)


def _fold_emptied(graph: gs.Graph, analysis: Analysis, kept: dict[int, int], namer: Namer) -> None:
    """Convs left reading no channel output their bias at every position: they become that
    constant, one value per channel (the liveness analysis admitted only emptied groups whose
    constants reach nothing that tells positions apart), and what follows on it folds away.
    What only fed the emptied groups goes with the cleanup."""
    f, _ = analysis.folded(kept)
    if f is None:
        return
    for node in [n for n in graph.nodes if n.outputs and n.outputs[0].name in f.reducers]:
        out = node.outputs[0]
        bias = _const(node, 2)
        cout = int(node.inputs[1].shape[0])
        value = bias if bias is not None else np.zeros(cout, np.asarray(node.inputs[1].values).dtype)
        node.outputs.clear()
        out.to_constant(value.reshape((1, cout) + (1,) * (len(node.inputs[1].shape) - 2)))
    graph.fold_constants(fold_shapes=False, should_exclude_node=lambda n: not any(
        o.name in f.constant for o in n.outputs))
    graph.cleanup(remove_unused_graph_inputs=False)
    joins = set(analysis.unit_convs(kept))
    for node in graph.nodes:
        if node.outputs and node.outputs[0].name in joins:
            _add_as_conv(node, namer)


def _add_as_conv(node: gs.Node, namer: Namer) -> None:
    """``x + c`` with one constant per channel of an NCHW map, as a 1×1 depthwise Conv of unit
    weights and bias ``c``: the same numbers, but onnxruntime's CPU provider keeps a Conv in its
    blocked layout and fuses the ReLU after it, where a broadcast Add costs a reorder on either
    side (open-nsfw with five blocks emptied: 0.9 ms of reorders, 14% of its run)."""
    const = [t for t in node.inputs if isinstance(t, gs.Constant)]
    live = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    c = np.asarray(const[0].values) if len(const) == 1 and len(live) == 1 else None
    if c is None or c.ndim != 4 or c.shape[0] != 1 or c.shape[2:] != (1, 1):
        raise PassContractError(f"{node.name}: the folded join is not a map plus one constant per channel")
    channels = c.shape[1]
    node.op = "Conv"
    node.attrs = {"group": channels, "kernel_shape": [1, 1]}
    set_inputs(node, [live[0], constant(namer, const[0].name + "_unit", np.ones((channels, 1, 1, 1), c.dtype)),
                      constant(namer, const[0].name + "_bias", c.reshape(channels))])
