"""Where the compressed network is cut into blocks for reconstruction.

A cut lies between two nodes of the compressed graph; what crosses it is the set of activations
computed before and read after it. A cut is usable where every float activation crossing it is
*comparable*: the original has the same tensor (the kept channels of it), so the block that ends
there can be fitted to the original's values. Block boundaries prefer cuts that only one
activation crosses — the output of a residual block, after its join — as block-wise
reconstruction (BRECQ) does; stretches with no such cut (a detector's neck, a U-Net's decoder,
where skip tensors stay alive) are split at the cuts fewest activations cross.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..ops import OPS
from ..outputs import targets

MIN_LAYERS = 2    # a block holds at least this many weight layers where the graph allows
MAX_LAYERS = 8    # ... and at most this many where a cut allows


@dataclass(frozen=True)
class Block:
    start: int                  # first node (index in the graph's node list)
    end: int                    # one past the last node
    inputs: tuple[str, ...]     # activations crossing the cut before it (fed in)
    live: tuple[str, ...]       # activations crossing the cut after it (what the next block is fed)
    compared: tuple[str, ...]   # what it computes that is fitted to the original
    layers: int                 # weight layers in it


class Liveness:
    """When each activation of a graph is computed and last read: which of them cross the cut
    between node ``i`` and node ``i + 1``."""

    def __init__(self, model: onnx.ModelProto):
        consts = {i.name for i in model.graph.initializer}
        consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        # graph inputs are made at -1, graph outputs read at len(nodes)
        self.made = {i.name: -1 for i in model.graph.input if i.name not in consts}
        self.last: dict[str, int] = {}
        for k, n in enumerate(model.graph.node):
            for i in n.input:
                if i in self.made:
                    self.last[i] = k
            if n.op_type != "Constant":
                self.made.update({o: k for o in n.output if o})
        for o in model.graph.output:
            self.last[o.name] = len(model.graph.node)

    def crossing(self, i: int) -> list[str]:
        return [t for t, p in self.made.items() if p <= i < self.last.get(t, -2)]


def _weight_layers(model: onnx.ModelProto) -> list[bool]:
    consts = {i.name for i in model.graph.initializer}
    return [OPS.of(n).layer and len(n.input) > 1 and n.input[1] in consts for n in model.graph.node]


def partition(model: onnx.ModelProto, floats: set[str], comparable: set[str]) -> list[Block]:
    """Blocks covering every node of ``model``; ``floats``: its float activations,
    ``comparable``: those the original has too (aligned)."""
    live = Liveness(model)
    crossing = live.crossing
    n = len(model.graph.node)
    layer = _weight_layers(model)
    count = [0]
    for is_layer in layer:
        count.append(count[-1] + is_layer)
    width: dict[int, int] = {}
    for i in range(n - 1):
        cross = [t for t in crossing(i) if t in floats]
        if cross and all(t in comparable for t in cross):
            width[i] = len(cross)

    def layers(a: int, b: int) -> int:   # weight layers in nodes a+1..b
        return count[b + 1] - count[a + 1]

    cuts, prev = [], -1
    for i in sorted(width):
        if width[i] == 1 and layers(prev, i) >= MIN_LAYERS and layers(i, n - 1) >= MIN_LAYERS:
            cuts.append(i)
            prev = i
    cuts = _split_long([-1] + cuts + [n - 1], width, layers)
    return [_block(model, a + 1, b + 1, live, floats, comparable, layers(a, b)) for a, b in zip(cuts, cuts[1:])]


def _split_long(cuts: list[int], width: dict[int, int], layers) -> list[int]:
    """``cuts`` with stretches of more than MAX_LAYERS layers split at their narrowest usable cut
    (nearest the middle among equals), as long as both sides keep MIN_LAYERS."""
    out = [cuts[0]]
    for a, b in zip(cuts, cuts[1:]):
        stack = [(a, b)]
        found: list[int] = []
        while stack:
            lo, hi = stack.pop()
            if layers(lo, hi) <= MAX_LAYERS:
                continue
            options = [i for i in width if lo < i < hi and layers(lo, i) >= MIN_LAYERS and layers(i, hi) >= MIN_LAYERS]
            if not options:
                continue
            mid = layers(lo, hi) / 2
            i = min(options, key=lambda i: (width[i], abs(layers(lo, i) - mid)))
            found.append(i)
            stack += [(lo, i), (i, hi)]
        out += sorted(found) + [b]
    return out


def _block(model: onnx.ModelProto, start: int, end: int, liveness: Liveness, floats: set[str],
           comparable: set[str], layers: int) -> Block:
    made = liveness.made
    inputs = liveness.crossing(start - 1) if start > 0 else [t for t, p in made.items() if p == -1]
    live = liveness.crossing(end - 1) if end < len(model.graph.node) else [o.name for o in model.graph.output]
    # a graph output is compared where the original's outputs are judged: the logits behind a Softmax
    judged = {t.output: t.tensor for t in targets(model)}
    compared = []
    for t in live:
        if start - 1 < made.get(t, -1) < end:
            t = judged.get(t, t) if start - 1 < made.get(judged.get(t, t), -1) < end else t
            if t in floats and t in comparable and t not in compared:
                compared.append(t)
    return Block(start, end, tuple(inputs), tuple(live), tuple(compared), layers)
