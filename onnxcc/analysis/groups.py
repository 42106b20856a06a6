"""Channel dependency groups and per-layer facts of a model, built once from the channel rules.

:func:`analyse` runs every node's rule in topological order, freezes what graph inputs and
outputs touch, and returns an :class:`Analysis`: the groups (each a class of united atoms), the
layers (Conv/ConvTranspose/Gemm/MatMul with their MACs and which groups scale them) and a cost
model that prices any plan (kept channels per group, rank per Conv) without touching the graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..ops import OPS
from .costs import node_macs, node_params
from .layout import Atoms, Layout, LayoutAlgebra
from .liveness import Fold, droppable, fold
from .op_rules import RuleContext, unknown
from .view import ModelView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """Tensor ``tensor`` holds the group's channels on ``axis`` starting at channel ``offset``."""

    tensor: str
    axis: int
    offset: int
    inner: int = 1
    outer: int = 1


@dataclass
class ChannelGroup:
    id: int
    size: int
    origins: tuple[str, ...]
    members: tuple[Member, ...]
    frozen: tuple[str, ...]
    reducers: frozenset[str] = frozenset()   # Convs reading only this group, where it may be emptied

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def droppable(self) -> bool:
        """May a plan keep none of its channels (see :mod:`.liveness`)?"""
        return bool(self.reducers)


@dataclass
class Layer:
    """A MAC-bearing node, keyed by its (unique) output tensor name."""

    key: str
    name: str
    op: str
    kernel: tuple[int, ...]
    cin: int
    cout: int
    group: int
    macs: int
    params: int
    out_layout: Layout | None
    red_layout: Layout | None
    hw_in: int = 1
    hw_out: int = 1
    in_size: tuple[int, ...] = ()      # spatial input size (Conv)
    strides: tuple[int, ...] = ()
    out_groups: tuple[int, ...] = ()
    in_groups: tuple[int, ...] = ()
    prunable: bool = False
    factorizable: bool = False
    shared: bool = False               # its weight or bias is read by other nodes too
    notes: list[str] = field(default_factory=list)

    @property
    def compressible(self) -> bool:
        return self.prunable or self.factorizable

    @property
    def kk(self) -> int:
        return int(np.prod(self.kernel)) if self.kernel else 1

    def max_useful_rank(self, cin: int | None = None, cout: int | None = None) -> int:
        """Largest SVD rank whose two-conv form has fewer MACs than the dense conv."""
        cin = self.cin if cin is None else cin
        cout = self.cout if cout is None else cout
        return int(np.ceil(cout * cin * self.kk / (cin * self.kk + cout))) - 1


@dataclass
class Analysis:
    view: ModelView
    atoms: Atoms
    layouts: dict[str, Layout]
    groups: dict[int, ChannelGroup]
    layers: list[Layer]
    total_macs: int

    def __post_init__(self) -> None:
        self.alg = LayoutAlgebra(self.atoms)
        self._folds: dict[frozenset[int], tuple[Fold, frozenset[str]]] = {}
        self._layout_sizes: dict[Layout, tuple[tuple[tuple[int, int], ...], int]] = {}

    @property
    def compressible_macs(self) -> int:
        return sum(l.macs for l in self.layers if l.compressible)

    def layer(self, key: str) -> Layer:
        return next(l for l in self.layers if l.key == key)

    def layout(self, tensor: str) -> Layout | None:
        lay = self.layouts.get(tensor)
        return None if lay is None else self.alg.live(lay)

    def group_of(self, atom: int) -> int:
        return self.atoms.find(atom)

    def mask(self, tensor: str, keep: dict[int, np.ndarray]) -> np.ndarray | None:
        """Kept-channel mask of ``tensor`` along its channel axis (None: no channel layout)."""
        lay = self.layout(tensor)
        return None if lay is None else self.alg.mask(lay, keep)

    def fraction(self, layout: Layout | None, kept: dict[int, int]) -> float:
        if layout is None:
            return 1.0
        sizes, full = self._sizes(layout)
        return sum(kept.get(g, n) for g, n in sizes) / full

    def _sizes(self, layout: Layout) -> tuple[tuple[tuple[int, int], ...], int]:
        """(group, channels) of each atom along ``layout`` and their total. Groups are final once
        analysed, and the allocator asks for the same layouts millions of times."""
        if layout not in self._layout_sizes:
            sizes = tuple((self.atoms.find(a), self.atoms.size[a]) for a in self.atoms.expand(layout.atoms))
            self._layout_sizes[layout] = sizes, sum(n for _, n in sizes)
        return self._layout_sizes[layout]

    def channels(self, layer: Layer, kept: dict[int, int]) -> tuple[int, int]:
        """(in, out) channels of ``layer`` when groups keep ``kept`` channels."""
        out_f = self.fraction(layer.out_layout, kept)
        # a grouped conv reduces within its groups only: its inputs go with its outputs
        in_f = out_f if layer.group > 1 and layer.red_layout is None else self.fraction(layer.red_layout, kept)
        return int(round(layer.cin * in_f)), int(round(layer.cout * out_f))

    def folded(self, kept: dict[int, int]) -> tuple[Fold | None, frozenset[str]]:
        """What emptying the groups ``kept`` leaves at zero folds to, and the layers it leaves
        without work (None and none when no group is emptied)."""
        emptied = frozenset(g for g, n in kept.items() if n == 0)
        if not emptied:
            return None, frozenset()
        if emptied not in self._folds:
            f = fold(self.view, frozenset().union(*(self.groups[g].reducers for g in emptied)))
            self._folds[emptied] = f, frozenset(l.key for l in self.layers if self.view.producer[l.key] not in f.needed)
        return self._folds[emptied]

    def dead(self, kept: dict[int, int]) -> frozenset[str]:
        return self.folded(kept)[1]

    def unit_convs(self, kept: dict[int, int]) -> list[str]:
        """Joins that add a folded constant to a live NCHW map: the prune pass writes each as a
        1×1 depthwise Conv (see ``passes.prune``), which counts one MAC per output element."""
        f = self.folded(kept)[0]
        if f is None:
            return []
        return [j for j in f.joins if self.view.nodes[self.view.producer[j]].op == "Add"
                and len(self.view.shape(j) or ()) == 4]

    def possible_unit_convs(self) -> set[str]:
        """Every join :meth:`unit_convs` may name, whichever groups a plan empties (the checks of
        :func:`.liveness.droppable` make the joins of several the union of each one's)."""
        return {j for gid, g in self.groups.items() if g.droppable for j in self.unit_convs({gid: 0})}

    def join_channels(self, join: str, kept: dict[int, int]) -> float:
        """Channels of an NCHW join's output when groups keep ``kept``."""
        return self.view.shape(join)[1] * self.fraction(self.layout(join), kept)

    def _unit_conv_macs(self, kept: dict[int, int]) -> float:
        return sum(int(np.prod(self.view.shape(j)[2:])) * self.join_channels(j, kept) for j in self.unit_convs(kept))

    def layer_macs(self, layer: Layer, kept: dict[int, int], rank: int | None = None) -> float:
        """MACs of ``layer`` when groups keep ``kept`` channels and the conv has ``rank``."""
        return 0.0 if layer.key in self.dead(kept) else self._live_macs(layer, kept, rank)

    def _live_macs(self, layer: Layer, kept: dict[int, int], rank: int | None) -> float:
        out_f, red_f = self.fraction(layer.out_layout, kept), self.fraction(layer.red_layout, kept)
        if rank is None:
            return layer.macs * out_f * red_f
        cin, cout = layer.cin * red_f, layer.cout * out_f
        return layer.hw_out * rank * (cin * layer.kk + cout)

    def macs(self, kept: dict[int, int] | None = None, ranks: dict[str, int] | None = None) -> int:
        kept, ranks = kept or {}, ranks or {}
        dead = self.dead(kept)
        delta = sum((0.0 if l.key in dead else self._live_macs(l, kept, ranks.get(l.key))) - l.macs
                    for l in self.layers) + self._unit_conv_macs(kept)
        return int(round(self.total_macs + delta))


def analyse(view: ModelView) -> Analysis:
    ctx = RuleContext(view)
    for node in view.nodes:
        spec = OPS.of(node)
        (spec.channel_rule or unknown)(ctx, node)
        if spec.layer:
            _tie_shared_weight(ctx, node)
        _freeze_subgraph_captures(ctx, node)
    for out in view.graph.outputs:
        ctx.freeze(ctx.layout(out), f"graph output {out.name}")
    layers = [_layer(ctx, node) for node in view.nodes if OPS.of(node).layer]
    total = sum(node_macs(view, n) for n in view.nodes)
    groups = _groups(ctx)
    for layer in layers:
        layer.prunable = any(groups[g].prunable for g in layer.out_groups + layer.in_groups)
    _mark_droppable(view, groups, layers)
    return Analysis(view, ctx.atoms, dict(ctx.layouts), groups, layers, total)


def _reduced_layout(ctx: RuleContext, node: gs.Node) -> Layout | None:
    """The layout of the channels a layer sums over (None: it reads none that can change)."""
    lin = ctx.layout(node.inputs[0])
    if lin is None:
        return None
    if node.op == "Conv":
        return lin if lin.axis == 1 and node.attrs.get("group", 1) == 1 else None
    if node.op == "ConvTranspose":
        return lin if lin.axis == 1 else None
    return lin if lin.axis == ctx.rank(node.inputs[0]) - 1 else None


def _tie_shared_weight(ctx: RuleContext, node: gs.Node) -> None:
    """Nodes reading one weight initializer (a Siamese branch, a filter bank applied at several
    dilations) lose the same channels, so that the weight stays one initializer: their output
    channels are united, and so are the channels they sum over."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return
    red, out = _reduced_layout(ctx, node), ctx.layout(node.outputs[0])
    first = ctx.weight_readers.setdefault(w.name, (node, red, out))
    if first[0] is node:
        return
    why = f"{node.op} {node.name}: shares weight {w.name} with {first[0].name}, channels cannot be matched"
    for a, b in ((first[1], red), (first[2], out)):
        if a is None and b is None:
            continue
        if a is None or b is None or ctx.alg.unify(a, b) is None:
            for lay in (a, b):
                ctx.freeze(lay, why)


def _mark_droppable(view: ModelView, groups: dict[int, ChannelGroup], layers: list[Layer]) -> None:
    """Give each group that may be emptied its reducers: the plain Convs that read only it (their
    output, with no input left, is their bias)."""
    candidates = {}
    for gid, g in groups.items():
        reducers = frozenset(l.key for l in layers if l.op == "Conv" and l.group == 1 and l.in_groups == (gid,))
        if g.prunable and reducers:
            candidates[gid] = reducers, {m.tensor for m in g.members}
    for gid in droppable(view, candidates):
        groups[gid].reducers = candidates[gid][0]


def _freeze_subgraph_captures(ctx: RuleContext, node: gs.Node) -> None:
    """If/Loop bodies read outer tensors by name, outside ``node.inputs``: freeze those too."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for inner in value.nodes:
                for t in inner.inputs:
                    ctx.freeze(ctx.layout(t), f"{node.op} {node.name}: read inside a subgraph")


def _groups(ctx: RuleContext) -> dict[int, ChannelGroup]:
    members: dict[int, list[Member]] = {}
    for name, layout in ctx.layouts.items():
        pos = 0
        for a in ctx.atoms.expand(layout.atoms):
            root = ctx.atoms.find(a)
            members.setdefault(root, []).append(Member(name, layout.axis, pos, layout.inner, layout.outer))
            pos += ctx.atoms.size[a]
    groups = {}
    for root, ms in members.items():
        origins = tuple(dict.fromkeys(ctx.atoms.origin[m] for m in ctx.atoms.members[root]))
        groups[root] = ChannelGroup(root, ctx.atoms.size[root], origins, tuple(ms),
                                    tuple(sorted(ctx.atoms.frozen.get(root, ()))))
    return groups


def _layer(ctx: RuleContext, node: gs.Node) -> Layer:
    view = ctx.view
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    wshape = view.shape(w) or ()
    xs, ys = view.shape(x) or (), view.shape(y) or ()
    group = node.attrs.get("group", 1)
    out_layout = ctx.layout(y)
    red = _reduced_layout(ctx, node)
    if node.op == "Conv":
        cout, cin, kernel = wshape[0], wshape[1] * group, tuple(wshape[2:])
    elif node.op == "ConvTranspose":
        cin, cout, kernel = wshape[0], wshape[1] * group, tuple(wshape[2:])
    else:
        trans_b = node.attrs.get("transB", 0) if node.op == "Gemm" else 0
        k_dim = len(wshape) - 2 if len(wshape) >= 2 else 0
        cin = wshape[k_dim + trans_b] if len(wshape) >= 2 else 0
        cout = wshape[k_dim + 1 - trans_b] if len(wshape) >= 2 else 0
        kernel = ()
    atoms = ctx.atoms
    groups_of = lambda lay: tuple(dict.fromkeys(atoms.find(a) for a in atoms.expand(lay.atoms))) if lay else ()
    layer = Layer(
        key=y.name, name=node.name or y.name, op=node.op, kernel=kernel, cin=int(cin), cout=int(cout),
        group=int(group), macs=node_macs(view, node), params=node_params(node),
        out_layout=out_layout, red_layout=red,
        hw_in=int(np.prod(xs[2:])) if len(xs) > 2 else 1, hw_out=int(np.prod(ys[2:])) if len(ys) > 2 else 1,
        in_size=tuple(int(d) for d in xs[2:]) if node.op in ("Conv", "ConvTranspose") else (),
        strides=tuple(node.attrs.get("strides", [1] * len(kernel))) if node.op in ("Conv", "ConvTranspose") else (),
        out_groups=groups_of(out_layout), in_groups=groups_of(red),
        shared=any(len(t.outputs) > 1 for t in node.inputs[1:3] if isinstance(t, gs.Constant)))
    layer.factorizable, why = _factorizable(view, node, layer)
    if why:
        layer.notes.append(why)
    return layer


def _factorizable(view: ModelView, node: gs.Node, layer: Layer) -> tuple[bool, str]:
    if node.op != "Conv":
        return False, ""
    if view.const(node.inputs[1]) is None:
        return False, "not factorized: weights are not constant"
    if layer.shared:   # two factor pairs would hold more than the one weight
        return False, f"not factorized: weight shared by {len(node.inputs[1].outputs)} nodes"
    if layer.group != 1:
        return False, "not factorized: " + ("depthwise" if layer.cin == layer.group else "grouped") + " conv"
    if layer.max_useful_rank() < 1:
        return False, "not factorized: too small for low rank to save MACs"
    return True, ""
