"""Channel bookkeeping: atoms, their equivalence classes, and per-tensor channel layouts.

A *channel space* is created wherever a layer chooses its output channels freely (Conv, Gemm, ...)
or where channels are fixed (graph inputs, unknown ops). It starts as one **atom**: a run of
channels that is always consumed whole. Two atoms are *united* when channel ``i`` of one must be
removed together with channel ``i`` of the other (both operands of a residual Add, say); a class
of united atoms is one prunable **channel group**.

Ops that take part of a channel axis (Split, Slice, Concat boundaries that later meet an Add)
*refine* a class: every atom of the class is cut at the same offset, so afterwards every layout is
again a sequence of whole atoms. This keeps the invariant that lets pruning be a simple mask:
for any tensor, the kept-channel mask is the concatenation of its atoms' class masks, each
channel repeated ``inner`` times and the whole sequence tiled ``outer`` times (Flatten of NCHW
repeats a channel over H·W features; Flatten of NHWC tiles the channel sequence H·W times).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Which atoms make up axis ``axis`` of a tensor (possibly naming atoms since refined)."""

    axis: int
    atoms: tuple[int, ...]
    inner: int = 1
    outer: int = 1

    def with_axis(self, axis: int) -> "Layout":
        return replace(self, axis=axis)


@dataclass
class Atoms:
    """Union-find over atoms with refinement (splitting a whole class at one offset)."""

    size: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    members: dict[int, list[int]] = field(default_factory=dict)
    split_into: dict[int, tuple[int, int]] = field(default_factory=dict)
    frozen: dict[int, set[str]] = field(default_factory=dict)
    origin: dict[int, str] = field(default_factory=dict)

    def new(self, size: int, origin: str, frozen: str | None = None) -> int:
        a = len(self.size)
        self.size.append(int(size))
        self.parent.append(a)
        self.members[a] = [a]
        self.origin[a] = origin
        if frozen:
            self.frozen[a] = {frozen}
        return a

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"cannot unite atoms of sizes {self.size[ra]} and {self.size[rb]}")
        if len(self.members[ra]) < len(self.members[rb]):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.members[ra].extend(self.members.pop(rb))
        reasons = self.frozen.pop(rb, set()) | self.frozen.get(ra, set())
        if reasons:
            self.frozen[ra] = reasons
        return ra

    def live(self, a: int) -> list[int]:
        """The current atoms that ``a`` has been refined into (``[a]`` if never split)."""
        if a not in self.split_into:
            return [a]
        left, right = self.split_into[a]
        return self.live(left) + self.live(right)

    def expand(self, atoms: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(x for a in atoms for x in self.live(a))

    def split_class(self, a: int, offset: int) -> None:
        """Cut every atom of ``a``'s class at ``offset``; halves stay united pairwise."""
        root = self.find(a)
        if not 0 < offset < self.size[root]:
            return
        reasons = self.frozen.get(root, set())
        lefts, rights = [], []
        for m in self.members.pop(root):
            left = self.new(offset, self.origin[m])
            right = self.new(self.size[m] - offset, self.origin[m])
            self.split_into[m] = (left, right)
            lefts.append(left)
            rights.append(right)
        self.frozen.pop(root, None)
        for half in (lefts, rights):
            r = half[0]
            for x in half[1:]:
                r = self.union(r, x)
            if reasons:
                self.frozen[self.find(r)] = set(reasons)

    def freeze(self, a: int, reason: str) -> None:
        self.frozen.setdefault(self.find(a), set()).add(reason)

    def is_frozen(self, a: int) -> bool:
        return self.find(a) in self.frozen


class LayoutAlgebra:
    """Operations on layouts that keep the whole-atom invariant (cut, slice, unify)."""

    def __init__(self, atoms: Atoms) -> None:
        self.atoms = atoms

    def live(self, layout: Layout) -> Layout:
        return replace(layout, atoms=self.atoms.expand(layout.atoms))

    def channels(self, layout: Layout) -> int:
        """Number of distinct channel positions (before ``inner``/``outer`` expansion)."""
        return sum(self.atoms.size[a] for a in self.atoms.expand(layout.atoms))

    def extent(self, layout: Layout) -> int:
        return self.channels(layout) * layout.inner * layout.outer

    def cut(self, layout: Layout, positions: list[int]) -> Layout:
        """Refine so that each position (in channel units) falls on an atom boundary."""
        for pos in sorted(set(positions)):
            start = 0
            for a in self.atoms.expand(layout.atoms):
                end = start + self.atoms.size[a]
                if start < pos < end:
                    self.atoms.split_class(a, pos - start)
                    break
                start = end
        return self.live(layout)

    def sub(self, layout: Layout, start: int, stop: int) -> Layout:
        """The atoms covering channel range [start, stop) (after cutting there)."""
        layout = self.cut(layout, [start, stop])
        picked, pos = [], 0
        for a in layout.atoms:
            if start <= pos < stop:
                picked.append(a)
            pos += self.atoms.size[a]
        return replace(layout, atoms=tuple(picked))

    def boundaries(self, layout: Layout) -> list[int]:
        out, pos = [], 0
        for a in self.atoms.expand(layout.atoms):
            pos += self.atoms.size[a]
            out.append(pos)
        return out[:-1]

    def unify(self, a: Layout, b: Layout) -> Layout | None:
        """Tie channel i of ``a`` to channel i of ``b``; None if their shapes cannot match."""
        if (a.inner, a.outer) != (b.inner, b.outer) or self.channels(a) != self.channels(b):
            return None
        cuts = self.boundaries(a) + self.boundaries(b)
        a, b = self.cut(a, cuts), self.cut(b, cuts)
        for x, y in zip(a.atoms, b.atoms):
            self.atoms.union(x, y)
        return self.live(a)

    def freeze(self, layout: Layout, reason: str) -> None:
        for a in self.atoms.expand(layout.atoms):
            self.atoms.freeze(a, reason)

    def mask(self, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Expanded kept-channel mask along the layout's axis (classes missing in keep: all kept)."""
        parts = []
        for a in self.atoms.expand(layout.atoms):
            m = keep.get(self.atoms.find(a))
            parts.append(np.ones(self.atoms.size[a], bool) if m is None else m)
        base = np.concatenate(parts) if parts else np.zeros(0, bool)
        return np.tile(np.repeat(base, layout.inner), layout.outer)
