"""Channel groups a plan may empty, and what an emptied group leaves to compute.

Emptying a group (the inner width of a residual branch, say) leaves each Conv that read only
its channels with no input at all: its output is its bias, the same at every position. What
follows on that constant until it meets live data is constant too and folds away, and what only
fed the group is no longer needed: a ResNet bottleneck emptied this way becomes ``x + c``. On a
2-core CPU a bottleneck cut to 8 channels still costs three Conv launches (0.2 ms of open-nsfw's
6.3 at half its MACs); emptied, it costs one Add.

A group may be emptied only where the folded graph computes exactly what the emulation did (the
full-size network with the group's reads zeroed): the constant may pass only through ops that
treat every position alike, so that a ``[1, C, 1, 1]`` tensor stands for the whole map, and must
end in a broadcasting join with a live tensor of the join's full shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..ops import OPS, Liveness
from .view import ModelView


@dataclass(frozen=True)
class Fold:
    """What is left when the layers ``reducers`` read no channel: tensors that become constant,
    and the nodes (indices into the view's nodes) still computed."""

    reducers: frozenset[str]
    constant: frozenset[str]
    needed: frozenset[int]
    joins: tuple[str, ...] = ()   # output tensors of the live nodes that read a constant


def fold(view: ModelView, reducers: frozenset[str]) -> Fold:
    nodes, producer = view.nodes, view.producer

    def stored(t: gs.Tensor) -> bool:
        return isinstance(t, gs.Constant) or (t.name in producer and nodes[producer[t.name]].op == "Constant")

    constant = set(reducers)
    for n in nodes:
        if n.outputs and n.outputs[0].name in reducers:
            continue
        ins = [t for t in n.inputs if t.name]
        if any(t.name in constant for t in ins) and all(t.name in constant or stored(t) for t in ins):
            constant.update(o.name for o in n.outputs)
    needed: set[int] = set()
    stack = [t.name for t in view.graph.outputs]
    while stack:
        name = stack.pop()
        i = producer.get(name)
        if i is None or i in needed or name in constant:
            continue
        needed.add(i)
        stack.extend(t.name for t in nodes[i].inputs if t.name)
    joins = tuple(nodes[i].outputs[0].name for i in sorted(needed)
                  if any(t.name in constant for t in nodes[i].inputs))
    return Fold(reducers, frozenset(constant), frozenset(needed), joins)


def droppable(view: ModelView, candidates: dict[int, tuple[frozenset[str], set[str]]]) -> set[int]:
    """The groups (of ``candidates``: id -> (reducers, member tensors)) that may be emptied, alone
    or together. Together they may when no join of one meets another's constant: then the
    constants of any subset are the union of each group's, and each group's check holds."""
    regions, meets = {}, {}
    for gid, (reducers, members) in candidates.items():
        f = fold(view, reducers)
        live = _joined(view, members, f)
        if live is not None:
            regions[gid], meets[gid] = f.constant, live
    return {g for g in regions if not any(meets[g] & regions[h] for h in regions if h != g)}


def _joined(view: ModelView, members: set[str], f: Fold) -> set[str] | None:
    """The live tensors the constants join, if folding ``f`` computes what the emulation does
    (the full-size network with the group's reads zeroed) with no live node left reading one of
    the emptied group's tensors (``members``); else None."""
    if any(t.name in f.constant for t in view.graph.outputs):
        return None
    if any(view.producer.get(m) in f.needed for m in members):
        return None
    live: set[str] = set()
    for i, n in enumerate(view.nodes):
        if not n.outputs or n.outputs[0].name in f.reducers:
            continue
        if any(o.name in f.constant for o in n.outputs):
            if not _uniform(view, n, f.constant):
                return None
        elif i in f.needed and any(t.name in f.constant for t in n.inputs):
            if not _join(view, n, f.constant):
                return None
            live.update(t.name for t in n.inputs if t.name not in f.constant)
    return live


def _uniform(view: ModelView, n: gs.Node, constant: frozenset[str]) -> bool:
    if n.op == "Conv":
        kernel = n.inputs[1].shape[2:] if n.inputs[1].shape else None
        return bool(kernel) and all(k == 1 for k in kernel) and not any(n.attrs.get("pads", []))
    # only an op whose output at a position depends on that position alone (or on all alike) may
    # carry a constant map as one value per channel
    if OPS.of(n).liveness is None:
        return False
    if n.op == "BatchNormalization":   # statistics per channel by definition
        return True
    # a stored operand must not vary along the spatial axes (a [C] vector broadcasts along W)
    rank = len(view.shape(n.outputs[0]) or ())
    for t in n.inputs:
        shape = view.shape(t) if t.name and t.name not in constant else None
        if shape is not None and any(d != 1 for d in shape[max(0, len(shape) - rank + 2):]):
            return False
    return True


def _join(view: ModelView, n: gs.Node, constant: frozenset[str]) -> bool:
    """A broadcasting join whose result has the shape of a live operand: the constant, at one
    value per channel, broadcasts to what it was."""
    if OPS.of(n).liveness is not Liveness.JOIN:
        return False
    out = view.shape(n.outputs[0])
    return any(t.name not in constant and view.shape(t) == out for t in n.inputs)
