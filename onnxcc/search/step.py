"""One step of the search: emulate the plan so far, measure every unit, land the step's plan.

Each unit's damage is measured at a few amounts (one per fraction of its grid, and emptying
where it can empty a branch) on the partly compressed model, with channels re-scored under the
current activations; the measurements are independent jobs (:meth:`WeightProbe.damages`). A
plan that measures far more damage than its units' curves add up to is landed again without
the unit that compounds.
"""
from __future__ import annotations

import logging
from functools import partial

import numpy as np

from .context import SearchContext
from .emulation import emulate, plan_weights
from .importance import channel_scores
from .landing import Offer, land
from .plan import Apply, Plan, Unit, units
from .statistics import Stats

log = logging.getLogger(__name__)


def take_step(ctx: SearchContext, plan: Plan, layer_stats: Stats, step: int) -> tuple[Plan, dict]:
    """The plan after ``step`` (from ``plan``, with ``layer_stats`` the layer statistics under the
    weights that emulate it), and its units' curves."""
    probe, tuning = ctx.probe, ctx.tuning
    weights, stats, base = emulate(probe, plan, layer_stats)
    if base is None:
        base = probe.damage(weights) if (plan.keep or plan.ranks) else 0.0
    scores = channel_scores(probe, plan, weights, stats)
    offers = [Offer(u, *u.grid(ctx, plan, scores, tuning.round_to)) for u in units(ctx.analysis, tuning.method)]
    offers = [o for o in offers if len(o.grid) > 1]
    _measure(ctx, plan, stats, weights, base, offers, step)
    if not offers:
        return plan, {}

    new, curves = land(ctx, stats, plan, scores, offers, step)
    culprit, damage = _compounding(ctx, stats, plan, new, [o.unit for o in offers], base, step)
    rest = [o for o in offers if o.unit is not culprit]
    if culprit is None or not rest:
        return new, curves
    other = land(ctx, stats, plan, scores, rest, step)[0]
    d_other = ctx.damage(other, stats)
    log.info("step %d: without %s the plan measures damage %.4g (%.4g with it)", step, culprit.name, d_other, damage)
    return (other if d_other < damage and ctx.budget.of(other) <= ctx.budget.of(new) + ctx.slack()
            else new), curves


def _measure(ctx: SearchContext, plan: Plan, stats: Stats, weights: dict[str, np.ndarray], base: float,
             offers: list[Offer], step: int) -> None:
    """Every offer's damage at its measured amounts, above the step's ``base`` damage.

    Each unit is measured first at its widest narrowing (and emptying, where it empties). A unit
    whose widest narrowing measures under ``flat_share`` of the median unit's is flat: its
    narrower amounts are priced on the line from nothing to its widest, a small error on a small
    damage, and are not measured. The other units are measured at all their amounts."""
    probe, tuning = ctx.probe, ctx.tuning
    amounts = [_measure_at(o.grid, tuning.fractions, o.unit.empties(ctx.analysis, plan)) for o in offers]
    found: list[dict[int, float]] = [{} for _ in offers]
    total = sum(len(every) for every, _ in amounts)
    done = iter(range(1, total + 1))

    def candidate(u: Unit, apply: Apply, k: int) -> dict[str, np.ndarray]:
        cand = plan.copy()
        apply(cand, k)
        return plan_weights(probe, cand, stats, u.touched)

    def tick() -> None:
        if ctx.progress:
            ctx.progress(f"step {step}/{tuning.steps}: measuring", next(done), total)

    def run(jobs: list[tuple[int, int]]) -> None:
        changes = [(offers[i].unit.touched, partial(candidate, offers[i].unit, offers[i].apply, k)) for i, k in jobs]
        for (i, k), d in zip(jobs, probe.damages(weights, changes, tick)):
            found[i][k] = d - base

    run([(i, k) for i, (_, decisive) in enumerate(amounts) for k in decisive])
    narrowing = {i: found[i][decisive[0]] for i, (every, decisive) in enumerate(amounts) if len(every) > len(decisive)}
    floor = tuning.flat_share * float(np.median(list(narrowing.values()))) if narrowing else 0.0
    flat = {i for i, d in narrowing.items() if d < floor}
    total -= sum(len(every) - len(decisive) for i, (every, decisive) in enumerate(amounts) if i in flat)
    run([(i, k) for i, (every, decisive) in enumerate(amounts) if i not in flat for k in every if k not in decisive])
    for o, measured in zip(offers, found):
        o.unit.measured = sorted(measured)
        o.unit.damage = [measured[k] for k in o.unit.measured]


def _measure_at(grid: np.ndarray, fractions: tuple[float, ...], emptying: bool) -> tuple[list[int], list[int]]:
    """The amounts of ``grid`` (0 first) whose damage is measured: the ones nearest each fraction
    of the largest; and of them the decisive ones, the widest narrowing first (then emptying).
    Emptying a group is a different kind of change from narrowing it (a folded branch, not a
    thinner one), so where the last amount empties, the fractions place themselves on the widths
    before it and emptying is measured besides: interpolating from emptying would price the
    narrowest widths by a damage they do not have."""
    widths = grid[1:-1] if emptying else grid[1:]
    picked = {int(widths[np.argmin(np.abs(widths - f * widths[-1]))]) for f in fractions} if len(widths) else set()
    decisive = ([int(widths[-1])] if len(widths) else []) + ([int(grid[-1])] if emptying else [])
    return sorted(picked | set(decisive)), decisive


def _compounding(ctx: SearchContext, stats: Stats, plan: Plan, new: Plan, changed_units: list[Unit],
                 base: float, step: int) -> tuple[Unit | None, float]:
    """The unit to leave out of this step, where the plan measures far more damage than its units'
    curves add up to: removals that each cost little can together break a layer (the last
    channels of a narrow hidden layer behind several thinned ones). Each changed unit, most
    damaging first, is undone in turn; the one whose undoing lowers the damage most is it."""
    a, tuning = ctx.analysis, ctx.tuning
    changed = [(u, k) for u in changed_units if (k := u.amount(a, plan, new)) > 0]
    if len(changed) < 2:
        return None, 0.0
    predicted = base + sum(u.damage_at(k) for u, k in changed)
    measured = ctx.damage(new, stats)
    if measured <= tuning.compounding * max(predicted, 0.0) + tuning.noise_damage:
        return None, measured
    suspects = sorted(changed, key=lambda c: -c[0].damage_at(c[1]))
    undone = [(ctx.damage(u.undo(plan, new), stats), i, u) for i, (u, _) in enumerate(suspects[:tuning.backoff_suspects])]
    best, _, culprit = min(undone)
    log.info("step %d: the plan measures damage %.4g where its units' curves add up to %.4g; undoing %s: "
             "%.4g; allocating again without it", step, measured, predicted, culprit.name, best)
    return culprit, measured
