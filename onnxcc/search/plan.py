"""What a search decides, and the units it decides over.

A :class:`Plan` is the whole decision: per channel group the kept-channel mask, per factorized
layer its rank. With the analysed model it is enough to rebuild the compressed one
(:mod:`onnxcc.passes.prune`, :mod:`onnxcc.passes.factorize`).

A step of the search offers each unit a grid of amounts to remove: a :class:`GroupUnit` prunes
channels of one group (lowest-scored first, or empties a droppable branch), a :class:`RankUnit`
lowers one layer's rank. Amounts keep widths and ranks at multiples the backend runs well.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..analysis.groups import Analysis, Layer
from ..config import Budget
from ..errors import TargetUnreachableError

if TYPE_CHECKING:
    from ..latency_model import LatencyModel
    from .context import SearchContext, SearchTuning

Apply = Callable[["Plan", int], None]   # sets an amount of a unit's removal on a plan


@dataclass
class Plan:
    """What to remove, in the analysed model's coordinates."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)   # group id -> kept-channel mask
    ranks: dict[str, int] = field(default_factory=dict)         # layer key -> SVD rank

    def copy(self) -> "Plan":
        return Plan({k: v.copy() for k, v in self.keep.items()}, dict(self.ranks))

    def kept(self) -> dict[int, int]:
        return {g: int(m.sum()) for g, m in self.keep.items()}

    def same(self, other: "Plan") -> bool:
        return (self.kept(), self.ranks) == (other.kept(), other.ranks)


def affected_layers(analysis: Analysis, unit: str | int) -> set[str]:
    """Layer keys whose emulated weight depends on a unit (a group id or a layer key)."""
    if isinstance(unit, str):
        return {unit}
    return {l.key for l in analysis.layers if unit in l.in_groups or unit in l.out_groups}


def min_keep(tuning: SearchTuning, size: int) -> int:
    return max(1, int(np.ceil(tuning.min_keep * size)))


def allowed(lo: int, hi: int, multiple: int, size: int) -> np.ndarray:
    """Counts in [lo, hi] the backend runs well: multiples of ``multiple``, except for a channel
    group or rank range (of ``size``) that never reached one: below a block, a width costs
    nearly as much as the whole block and runs unblocked."""
    if hi < lo:
        return np.zeros(0, int)
    if size <= multiple:
        return np.arange(lo, hi + 1)
    return np.arange(max(lo + (-lo) % multiple, multiple), hi + 1, multiple)


def thin(grid: np.ndarray, most: int = 65) -> np.ndarray:
    """At most ``most`` options (first and last kept): savings are exact at each, damage is
    interpolated between measurements anyway."""
    if len(grid) <= most:
        return grid
    return grid[np.unique(np.round(np.linspace(0, len(grid) - 1, most)).astype(int))]


def _remove_lowest(mask: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    m = mask.copy()
    if k > 0:
        live = np.flatnonzero(m)
        m[live[np.argsort(scores[live], kind="stable")[:k]]] = False
    return m


@dataclass
class Unit(ABC):
    """One compression unit of a step, with the amounts its damage was measured at this step."""

    touched: set[str]                 # layer keys whose emulated weights depend on it
    measured: list[int] = field(default_factory=list, kw_only=True)   # amounts removed where damage was measured
    damage: list[float] = field(default_factory=list, kw_only=True)

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def grid(self, ctx: SearchContext, plan: Plan, scores: dict[int, np.ndarray],
             multiple: int) -> tuple[np.ndarray, Apply]:
        """The amounts this unit may remove at this step (0 first), keeping widths or ranks at
        multiples of ``multiple``, and how to apply an amount to a plan."""

    @abstractmethod
    def amount(self, a: Analysis, before: Plan, after: Plan) -> int:
        """How much this unit removes going from ``before`` to ``after`` (channels, or rank steps)."""

    @abstractmethod
    def slot(self, plan: Plan) -> tuple[dict, int | str]:
        """Where ``plan`` holds this unit's decision: (the plan's dict, the key in it)."""

    def undo(self, before: Plan, after: Plan) -> Plan:
        """``after`` with this unit as it was in ``before``."""
        p = after.copy()
        store, key = self.slot(p)
        old = self.slot(before)[0].get(key)
        if old is None:
            store.pop(key, None)
        else:
            store[key] = old.copy() if isinstance(old, np.ndarray) else old
        return p

    def emptiable(self, a: Analysis) -> bool:
        """Whether removing all of it folds a branch away (a different kind of change from narrowing)."""
        return False

    def empties(self, a: Analysis, plan: Plan) -> bool:
        """Whether the largest amount on this step's grid empties the unit's group."""
        return False

    def damage_at(self, k: float) -> float:
        """Measured damage at amount ``k``, interpolated between this step's measurements."""
        return float(np.interp(k, [0] + self.measured, [0.0] + self.damage))


@dataclass
class GroupUnit(Unit):
    """A channel group to prune."""

    gid: int

    @property
    def name(self) -> str:
        return f"group:{self.gid}"

    def grid(self, ctx: SearchContext, plan: Plan, scores: dict[int, np.ndarray],
             multiple: int) -> tuple[np.ndarray, Apply]:
        g = ctx.analysis.groups[self.gid]
        n = plan.kept().get(self.gid, g.size)
        mask = plan.keep.get(self.gid, np.ones(g.size, bool))
        remaining = allowed(min_keep(ctx.tuning, g.size), n - 1, multiple, g.size)
        if g.droppable and n > 0:
            remaining = np.append(0, remaining)   # emptied: the branch folds to a constant
        gid = self.gid

        def prune(p: Plan, k: int) -> None:
            p.keep[gid] = _remove_lowest(mask, scores[gid], int(k))
        return thin(np.array([0] + sorted(n - remaining), int)), prune

    def amount(self, a: Analysis, before: Plan, after: Plan) -> int:
        size = a.groups[self.gid].size
        return before.kept().get(self.gid, size) - after.kept().get(self.gid, size)

    def slot(self, plan: Plan) -> tuple[dict, int]:
        return plan.keep, self.gid

    def emptiable(self, a: Analysis) -> bool:
        return a.groups[self.gid].droppable

    def empties(self, a: Analysis, plan: Plan) -> bool:
        if not self.emptiable(a):
            return False
        mask = plan.keep.get(self.gid)
        return mask is None or bool(mask.any())


@dataclass
class RankUnit(Unit):
    """A layer's rank to lower (an SVD pair replaces it)."""

    layer: Layer

    @property
    def name(self) -> str:
        return f"rank:{self.layer.key}"

    def grid(self, ctx: SearchContext, plan: Plan, scores: dict[int, np.ndarray],
             multiple: int) -> tuple[np.ndarray, Apply]:
        a, layer, kept = ctx.analysis, self.layer, plan.kept()
        cin, cout = a.channels(layer, kept)
        if layer.key in a.dead(kept) or not (cin and cout):   # folded away by an emptied group
            return np.zeros(1, int), lambda p, k: None
        current = plan.ranks.get(layer.key)
        upper = layer.max_useful_rank(cin, cout) if current is None else current - 1
        start = upper + 1 if current is None else current
        ranks = allowed(1, upper, multiple, layer.max_useful_rank())
        if ctx.latency is not None:
            strict = ctx.budget.kind == "flops"
            ranks = ranks[[rank_pays(a, ctx.latency, layer, kept, int(r), strict) for r in ranks]]

        def factorize(p: Plan, k: int) -> None:
            if k > 0:
                p.ranks[layer.key] = int(start - k)
        return thin(np.array([0] + sorted(start - ranks), int)), factorize

    def amount(self, a: Analysis, before: Plan, after: Plan) -> int:
        key = self.layer.key
        if key not in after.ranks:
            return 0
        start = before.ranks.get(key, self.layer.max_useful_rank(*a.channels(self.layer, before.kept())) + 1)
        return start - after.ranks[key]

    def slot(self, plan: Plan) -> tuple[dict, str]:
        return plan.ranks, self.layer.key


def units(a: Analysis, method: str) -> list[Unit]:
    """Every unit ``method`` compresses through: prunable groups (cc, prune), factorizable layers
    (cc, decompose)."""
    out: list[Unit] = []
    if method in ("cc", "prune"):
        out += [GroupUnit(affected_layers(a, gid), gid) for gid, g in a.groups.items() if g.prunable]
    if method in ("cc", "decompose"):
        out += [RankUnit(affected_layers(a, l.key), l) for l in a.layers if l.factorizable]
    return out


def extreme_plan(a: Analysis, tuning: SearchTuning) -> Plan:
    """The most ``tuning.method`` can remove: every group at its floor (or emptied), every rank 1."""
    plan = Plan()
    if tuning.method in ("cc", "prune"):
        for gid, g in a.groups.items():
            if g.prunable:
                m = np.zeros(g.size, bool)
                if not g.droppable:
                    # no width of the multiple between the floor and the group's size: it stays whole
                    floor = allowed(min_keep(tuning, g.size), g.size, tuning.round_to, g.size)
                    m[:floor[0] if len(floor) else g.size] = True
                plan.keep[gid] = m
    if tuning.method in ("cc", "decompose"):
        plan.ranks = {l.key: int(allowed(1, l.max_useful_rank(), tuning.round_to, l.max_useful_rank())[0])
                      for l in a.layers if l.factorizable}
    return plan


def check_reachable(a: Analysis, tuning: SearchTuning, budget: Budget) -> None:
    """Refuse a budget the extreme plan cannot meet, naming how much could be removed."""
    extreme = extreme_plan(a, tuning)
    best = min(budget.of(extreme), budget.of(Plan(extreme.keep)))  # rank-1 pairs may be slow
    if best > budget.target():
        reach = 1 - best / budget.total
        what = "MACs" if budget.kind == "flops" else "predicted latency"
        raise TargetUnreachableError(
            f"--{budget.kind} {budget.fraction} is out of reach for this model with --method {tuning.method}: "
            f"at most {reach:.3f} of its {what} can be removed")


def rank_pays(a: Analysis, lat: LatencyModel, layer: Layer, kept: dict[int, int], rank: int, strict: bool) -> bool:
    """Is the SVD pair at ``rank`` faster than the dense layer at these widths? ``strict`` (MAC
    budgets): faster than the dense layer would be with the pair's MACs, i.e. at least as fast
    per MAC — otherwise pruning the same MACs elsewhere buys more speed, and under a MAC budget
    that is the alternative."""
    dense = lat.layer_seconds(layer, kept)
    if strict:
        dense *= a.layer_macs(layer, kept, rank) / max(a.layer_macs(layer, kept), 1.0)
    return lat.layer_seconds(layer, kept, rank) < dense


def drop_useless_ranks(a: Analysis, plan: Plan, lat: LatencyModel | None = None, strict: bool = False) -> None:
    """A rank that no longer saves MACs on the pruned layer — or, with the latency model, runs
    slower than the dense layer — would only add a conv: drop it."""
    kept = plan.kept()
    for key in list(plan.ranks):
        layer = a.layer(key)
        slower = lat is not None and not rank_pays(a, lat, layer, kept, plan.ranks[key], strict)
        if slower or a.layer_macs(layer, kept, plan.ranks[key]) >= a.layer_macs(layer, kept):
            del plan.ranks[key]
