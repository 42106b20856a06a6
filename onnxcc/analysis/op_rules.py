"""How channels flow through each op: one rule per op type, registered in the op registry.

A rule reads the layouts of a node's inputs and sets the layouts of its outputs; on the way it
creates channel spaces (layers that choose their output channels), unites classes (residual
joins), refines them (Split/Slice), or freezes them with a reason. An op without a rule freezes
every channel that reaches it — never a guess.

A rule registered with ``params=True`` marks an op whose *parameters* depend on the channel
count (weights, per-channel constants, shape vectors): the prune pass must have a handler for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..graph import pad_spec
from ..ops import OPS
from .layout import Atoms, Layout, LayoutAlgebra
from .view import ModelView

Rule = Callable[["RuleContext", gs.Node], None]


@dataclass
class RuleContext:
    view: ModelView
    atoms: Atoms = field(default_factory=Atoms)
    layouts: dict[str, Layout] = field(default_factory=dict)
    # weight name -> (first reader, the layout it sums over, its output layout)
    weight_readers: dict[str, tuple[gs.Node, Layout | None, Layout | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.alg = LayoutAlgebra(self.atoms)

    # -- lookups ---------------------------------------------------------------------------
    def layout(self, t: gs.Tensor | None) -> Layout | None:
        if t is None or not t.name or t.name not in self.layouts:
            return None
        return self.alg.live(self.layouts[t.name])

    def set(self, t: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and t.name:
            self.layouts[t.name] = layout

    def shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        return self.view.shape(t)

    def rank(self, t: gs.Tensor) -> int:
        s = self.shape(t)
        return len(s) if s is not None else -1

    def is_const(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant)

    # -- actions ---------------------------------------------------------------------------
    def new_space(self, t: gs.Tensor, axis: int, node: gs.Node, frozen: str | None = None) -> Layout:
        size = self.shape(t)[axis]
        layout = Layout(axis, (self.atoms.new(size, node.name or t.name, frozen),))
        self.set(t, layout)
        return layout

    def fixed_space(self, t: gs.Tensor, axis: int, reason: str) -> Layout:
        """A layout for a tensor whose channels nobody can choose (graph input, unknown op)."""
        layout = Layout(axis, (self.atoms.new(self.shape(t)[axis], t.name, reason),))
        self.set(t, layout)
        return layout

    def freeze(self, layout: Layout | None, reason: str) -> None:
        if layout is not None:
            self.alg.freeze(layout, reason)

    def freeze_inputs(self, node: gs.Node, reason: str) -> None:
        for t in node.inputs:
            self.freeze(self.layout(t), reason)


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _why(node: gs.Node, text: str) -> str:
    return f"{node.op} {node.name}: {text}"


# ---- pass-through ops: same channels out as in -------------------------------------------------

@OPS.channel_rule(*OPS.family("unary"), *OPS.family("pool"))
def pass_through(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if len(node.outputs) > 1 and node.op == "MaxPool" and node.outputs[1].outputs:
        ctx.freeze(layout, _why(node, "MaxPool indices encode channel positions"))
        return
    if OPS.of(node).family == "pool" and _on_spatial_axis(ctx, node, layout):
        return
    ctx.set(node.outputs[0], layout)


def _on_spatial_axis(ctx: RuleContext, node: gs.Node, layout: Layout | None) -> bool:
    """Channels that a windowed op (Conv, pooling) slides over as a spatial axis — a spectrogram's
    frequency bins made by a Conv1D and read by a Conv2D, say — mix with their neighbours, and
    removing one would change the spatial size: they are frozen."""
    if layout is None or layout.axis < 2:
        return False
    ctx.freeze(layout, _why(node, f"slides over the channels as spatial axis {layout.axis}"))
    return True


@OPS.channel_rule("Resize", "Upsample", "Pad", params=True)
def spatial_only(ctx: RuleContext, node: gs.Node) -> None:
    """Resize/Pad keep channels if they leave the channel axis alone (checked on shapes); a
    constant Pad on the channel axis (a ResNet shortcut widened with zero channels) adds fixed
    channels around the ones it passes on."""
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    si, so = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if si is None or so is None:
        ctx.freeze(layout, _why(node, "unknown shapes"))
        return
    if si[layout.axis] == so[layout.axis]:
        ctx.set(node.outputs[0], layout)
        return
    spec = pad_spec(node, len(si), ctx.view.const) if node.op == "Pad" else None
    if spec is None or layout.inner != 1 or layout.outer != 1 or min(spec[0][layout.axis], spec[1][layout.axis]) < 0:
        ctx.freeze(layout, _why(node, "changes the channel axis"))
        return
    made = [(ctx.atoms.new(n, node.name, _why(node, "channels made by padding")),) if n else ()
            for n in (spec[0][layout.axis], spec[1][layout.axis])]
    ctx.set(node.outputs[0], Layout(layout.axis, made[0] + layout.atoms + made[1]))


@OPS.channel_rule("BatchNormalization", "InstanceNormalization", params=True)
def per_channel_norm(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    if layout.axis != 1 or any(not ctx.is_const(t) for t in node.inputs[1:] if t.name):
        ctx.freeze(layout, _why(node, "statistics not per-channel constants on axis 1"))
        return
    if len(node.outputs) > 1 and any(o.outputs for o in node.outputs[1:]):
        ctx.freeze(layout, _why(node, "training-mode outputs in use"))
        return
    ctx.set(node.outputs[0], layout)


@OPS.channel_rule("Transpose")
def transpose(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    rank = ctx.rank(node.inputs[0])
    perm = list(attr(node, "perm", list(range(rank))[::-1]))
    ctx.set(node.outputs[0], layout.with_axis(perm.index(layout.axis)))


# ---- joins: Add, Mul, Concat ... ---------------------------------------------------------------

@OPS.channel_rule(*OPS.family("elementwise"), params=True)
def elementwise(ctx: RuleContext, node: gs.Node) -> None:
    """Broadcasting ops tie the channels of every full-width operand together.

    Constant operands with more than one entry on the channel axis are per-channel constants:
    the prune handler slices them. An operand whose channels are fixed (a graph input, say)
    freezes everything it meets.
    """
    out = node.outputs[0]
    out_shape = ctx.shape(out)
    if out_shape is None:
        ctx.freeze_inputs(node, _why(node, "unknown output shape"))
        return
    rank = len(out_shape)
    carried, fixed = [], []
    for t in node.inputs:
        if not t.name or ctx.is_const(t):
            continue
        layout, shape = ctx.layout(t), ctx.shape(t)
        if layout is None:
            fixed.append(shape)
            continue
        aligned = layout.with_axis(layout.axis + rank - len(shape))
        if shape[layout.axis] == 1 and out_shape[aligned.axis] != 1:
            ctx.freeze(layout, _why(node, "single channel broadcast over many"))
            continue
        carried.append(aligned)
    if not carried:
        return
    if len({c.axis for c in carried}) > 1:
        for c in carried:
            ctx.freeze(c, _why(node, "operands carry channels on different axes"))
        return
    axis = carried[0].axis
    for shape in fixed:
        a = axis - (rank - len(shape)) if shape is not None else -1
        if shape is None or (a >= 0 and shape[a] != 1):
            for c in carried:
                ctx.freeze(c, _why(node, "combined with a tensor whose channels are fixed"))
    ctx.set(out, _unify_all(ctx, node, carried))


def _unify_all(ctx: RuleContext, node: gs.Node, layouts: list[Layout]) -> Layout | None:
    """Tie all layouts channel-by-channel; if any pair cannot match, freeze them all."""
    unified = layouts[0]
    for other in layouts[1:]:
        unified = ctx.alg.unify(unified, other)
        if unified is None:
            for lay in layouts:
                ctx.freeze(lay, _why(node, "operands' channel layouts cannot be matched"))
            return None
    return unified


@OPS.channel_rule("Concat")
def concat(ctx: RuleContext, node: gs.Node) -> None:
    out = node.outputs[0]
    rank = ctx.rank(out)
    axis = _axis(attr(node, "axis"), rank)
    layouts = [ctx.layout(t) for t in node.inputs]
    present = [lay for lay in layouts if lay is not None]
    if not present:
        return
    if all(lay.axis == axis and lay.inner == 1 and lay.outer == 1 for lay in present):
        parts = [lay if lay is not None else ctx.fixed_space(t, axis, _why(node, "fixed-width input"))
                 for t, lay in zip(node.inputs, layouts)]
        ctx.set(out, Layout(axis, tuple(a for p in parts for a in ctx.alg.live(p).atoms)))
        return
    if any(lay.axis == axis for lay in present) or len({lay.axis for lay in present}) > 1:
        for lay in present:
            ctx.freeze(lay, _why(node, "concatenates across a flattened or mixed channel axis"))
        return
    if len(present) < len(layouts):  # a fixed-width tensor joins along another axis
        for lay in present:
            ctx.freeze(lay, _why(node, "joined with a tensor whose channels are fixed"))
    ctx.set(out, _unify_all(ctx, node, present))


@OPS.channel_rule("Split", params=True)
def split(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    axis = _axis(attr(node, "axis", 0), ctx.rank(node.inputs[0]))
    if axis != layout.axis:
        for o in node.outputs:
            ctx.set(o, layout)
        return
    if layout.inner != 1 or layout.outer != 1:
        ctx.freeze(layout, _why(node, "splits a flattened channel axis"))
        return
    start = 0
    for o in node.outputs:
        size = ctx.shape(o)[axis]
        ctx.set(o, ctx.alg.sub(layout, start, start + size))
        start += size


@OPS.channel_rule("Slice", params=True)
def slice_(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    si, so = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
    if si[layout.axis] == so[layout.axis]:
        ctx.set(node.outputs[0], layout)
        return
    rng = slice_range(ctx.view, node, layout.axis, si[layout.axis])
    if rng is None or layout.inner != 1 or layout.outer != 1:
        ctx.freeze(layout, _why(node, "slices the channel axis with a computed or strided range"))
        return
    ctx.set(node.outputs[0], ctx.alg.sub(layout, *rng))


def slice_params(view: ModelView, node: gs.Node) -> tuple[list, list, list, list] | None:
    """(starts, ends, axes, steps) as Python lists, from inputs (opset >= 10) or attributes."""
    if "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    vals = [view.const(t) if i < len(node.inputs) and node.inputs[i].name else None
            for i, t in zip(range(1, 5), list(node.inputs[1:5]) + [None] * 4)]
    starts, ends, axes, steps = vals
    if starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3].name and axes is None) \
            or (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        return None
    n = len(starts)
    axes = list(axes) if axes is not None else list(range(n))
    steps = list(steps) if steps is not None else [1] * n
    return list(starts), list(ends), axes, steps


def slice_range(view: ModelView, node: gs.Node, axis: int, dim: int) -> tuple[int, int] | None:
    params = slice_params(view, node)
    if params is None:
        return None
    starts, ends, axes, steps = params
    rank = len(view.shape(node.inputs[0]))
    for s, e, a, st in zip(starts, ends, axes, steps):
        if _axis(int(a), rank) == axis:
            if int(st) != 1:
                return None
            return tuple(int(v) for v in slice(int(s), int(e)).indices(dim)[:2])
    return 0, dim


# ---- reductions and softmax -----------------------------------------------------------------

@OPS.channel_rule(*OPS.family("reduce"))
def reduce(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    rank = ctx.rank(node.inputs[0])
    if "axis" in node.attrs or node.op in ("ArgMax", "ArgMin"):
        axes = [attr(node, "axis", 0)]
    elif "axes" in node.attrs:
        axes = list(node.attrs["axes"])
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = ctx.view.value(node.inputs[1])
        axes = None if axes is None else list(axes.reshape(-1))
    else:
        axes = []
    if axes is None:
        ctx.freeze(layout, _why(node, "computed reduction axes"))
        return
    axes = sorted(_axis(int(a), rank) for a in axes) or list(range(rank))
    if layout.axis in axes:
        ctx.freeze(layout, _why(node, "reduces over the channel axis"))
        return
    keep = attr(node, "keepdims", 1)
    ctx.set(node.outputs[0], layout.with_axis(layout.axis - (0 if keep else sum(a < layout.axis for a in axes))))


@OPS.channel_rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    rank = ctx.rank(node.inputs[0])
    opset = ctx.view.graph.opset
    axis = _axis(attr(node, "axis", -1 if opset >= 13 else 1), rank)
    touches = layout.axis >= axis if opset < 13 else layout.axis == axis
    if touches:
        ctx.freeze(layout, _why(node, "normalises over the channel axis"))
        return
    ctx.set(node.outputs[0], layout)


# ---- reshapes -------------------------------------------------------------------------------

def map_reshape(si: tuple[int, ...], so: tuple[int, ...], layout: Layout) -> Layout | None:
    """Where the channel axis lands when a row-major reshape turns ``si`` into ``so``.

    The channel axis may merge with neighbours (Flatten): dims merged from the left tile the
    channel sequence (``outer``), dims merged from the right repeat each channel (``inner``).
    A reshape that splits the channel axis itself returns None.
    """
    ax = layout.axis
    pre, c, post = int(np.prod(si[:ax])), si[ax], int(np.prod(si[ax + 1:]))
    acc = 1
    for j, d in enumerate(so):
        if pre % acc == 0:
            o = pre // acc
            if d % (o * c) == 0:
                m = d // (o * c)
                if post % m == 0 and int(np.prod(so[j + 1:])) * m == post:
                    return Layout(j, layout.atoms, layout.inner * m, layout.outer * o)
        acc *= d
        if acc > pre:
            break
    return None


@OPS.channel_rule("Reshape", params=True)
def reshape(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    mapped = map_reshape(ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0]), layout)
    if mapped is None:
        ctx.freeze(layout, _why(node, "reshape splits the channel axis"))
        return
    target = ctx.view.value(node.inputs[1])
    if target is None:
        ctx.freeze(layout, _why(node, "reshape target is not known"))
        return
    entry = int(target.reshape(-1)[mapped.axis])
    copies_axis = entry == 0 and (mapped.axis, mapped.inner, mapped.outer) == (layout.axis, layout.inner, layout.outer)
    literal_ok = entry > 0 and ctx.is_const(node.inputs[1])
    if not (entry == -1 or copies_axis or literal_ok):
        ctx.freeze(layout, _why(node, "reshape target fixes the channel count"))
        return
    ctx.set(node.outputs[0], mapped)


@OPS.channel_rule("Flatten", "Squeeze", "Unsqueeze")
def flatten(ctx: RuleContext, node: gs.Node) -> None:
    layout = ctx.layout(node.inputs[0])
    if layout is None:
        return
    mapped = map_reshape(ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0]), layout)
    if mapped is None:
        ctx.freeze(layout, _why(node, "cannot follow the channel axis"))
        return
    ctx.set(node.outputs[0], mapped)


@OPS.channel_rule("Shape", "Size")
def shape_of(ctx: RuleContext, node: gs.Node) -> None:
    """Reading a shape constrains nothing by itself; consumers of the value are checked."""


# ---- layers: where channel spaces are born -----------------------------------------------------

@OPS.channel_rule("Conv", params=True)
def conv(ctx: RuleContext, node: gs.Node) -> None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    lin = ctx.layout(x)
    if _on_spatial_axis(ctx, node, lin):
        lin = None
    group = attr(node, "group", 1)
    W = ctx.view.const(w)
    bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or ctx.is_const(node.inputs[2])
    if W is None or not bias_ok:
        ctx.freeze(lin, _why(node, "weights are not constant"))
        ctx.new_space(y, 1, node, _why(node, "weights are not constant"))
        return
    cout, cin_g = W.shape[:2]
    if group == 1:
        ctx.new_space(y, 1, node)
        return
    if cin_g == 1 and cout == group:  # depthwise: output channel c is input channel c
        if lin is not None and lin.axis == 1:
            ctx.set(y, lin)
        else:
            ctx.new_space(y, 1, node, _why(node, "depthwise over fixed channels"))
        return
    why = _why(node, "grouped convolution" if cin_g > 1 else "depthwise with channel multiplier")
    ctx.freeze(lin, why)
    ctx.new_space(y, 1, node, why)


@OPS.channel_rule("ConvTranspose", params=True)
def conv_transpose(ctx: RuleContext, node: gs.Node) -> None:
    lin, y = ctx.layout(node.inputs[0]), node.outputs[0]
    _on_spatial_axis(ctx, node, lin)
    W = ctx.view.const(node.inputs[1])
    bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or ctx.is_const(node.inputs[2])
    if W is None or not bias_ok or attr(node, "group", 1) != 1:
        why = _why(node, "grouped or non-constant transposed convolution")
        ctx.freeze(lin, why)
        ctx.new_space(y, 1, node, why)
        return
    ctx.new_space(y, 1, node)


@OPS.channel_rule("Gemm", params=True)
def gemm(ctx: RuleContext, node: gs.Node) -> None:
    lin, y = ctx.layout(node.inputs[0]), node.outputs[0]
    B = ctx.view.const(node.inputs[1])
    c = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    bad = (B is None or attr(node, "transA", 0) or (c is not None and not ctx.is_const(c)))
    if bad or (lin is not None and lin.axis != 1):
        why = _why(node, "non-constant weights or transposed input")
        ctx.freeze(lin, why)
        ctx.new_space(y, 1, node, why)
        return
    ctx.new_space(y, 1, node)


@OPS.channel_rule("MatMul", params=True)
def matmul(ctx: RuleContext, node: gs.Node) -> None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    lin = ctx.layout(a)
    B = ctx.view.const(b)
    if B is None or B.ndim != 2:
        why = _why(node, "product of two activations")
        ctx.freeze(lin, why)
        ctx.freeze(ctx.layout(b), why)
        return
    rank = ctx.rank(y)
    if lin is not None and lin.axis != ctx.rank(a) - 1:
        ctx.set(y, lin.with_axis(lin.axis + rank - ctx.rank(a)))  # channels ride along an outer axis
        return
    ctx.new_space(y, rank - 1, node)


def unknown(ctx: RuleContext, node: gs.Node) -> None:
    ctx.freeze_inputs(node, _why(node, "op not understood by onnxcc"))
