"""A step's plan from its units' measured curves, landed on the step's budget.

The allocation (:mod:`.allocation`) solves for the least predicted damage at a cost; landing
decides which of its plans to keep: on the backend's multiples where they reach the budget, on
finer grids only where those measure clearly less damage, and a plan that removes more than
asked where the plans on the budget measure out of all proportion more damage.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .allocation import fit_exponential, give_back, interpolate, land_near, outside, settle, solve
from .context import SearchContext
from .plan import Apply, Plan, Unit, drop_useless_ranks
from .statistics import Stats

log = logging.getLogger(__name__)

Grid = tuple[np.ndarray, Apply]   # a unit's amounts at this step (0 first) and how to apply one


@dataclass
class Offer:
    """What a step offers one unit: its amounts on the backend's multiples, and how to apply one."""

    unit: Unit
    grid: np.ndarray
    apply: Apply


def land(ctx: SearchContext, stats: Stats, plan: Plan, scores: dict[int, np.ndarray], offers: list[Offer],
         step: int) -> tuple[Plan, dict]:
    """This step's plan from the units' measured curves, and the curves for the report.

    The budget is met on the backend-friendly grid when it can be; where its steps are too
    coarse to land (narrow layers, small models), the same measurements are interpolated on
    finer grids, down to single channels. Steps before the last may remove up to
    ``step_overshoot`` of a step more than their share (the next step re-measures and takes
    less); the last must land within the tolerance."""
    tuning, budget = ctx.tuning, ctx.budget
    target, slack = ctx.target(step), ctx.slack()
    over = 0.0 if step == tuning.steps else tuning.step_overshoot
    band = (min(target - 2 * slack, budget.target((step + over) / tuning.steps)), target + slack)
    landed, nearest, beyond = [], None, None
    for multiple in _finer(tuning.round_to):
        grids = ([(o.grid, o.apply) for o in offers] if multiple == tuning.round_to
                 else [o.unit.grid(ctx, plan, scores, multiple) for o in offers])
        new, curves, free = allocate(ctx, plan, [o.unit for o in offers], grids, multiple, band, step)
        if beyond is None and budget.of(free) <= band[1]:
            beyond = _Measured(ctx, stats, free, curves)
        miss = outside(budget.of(new), *band)
        if miss == (False, 0.0) and not (beyond and beyond.dwarfs(new, multiple, step)):
            landed.append((multiple, new, curves))
            if len(landed) == 2:
                break
        elif miss != (False, 0.0) and (nearest is None or miss < nearest[0]):
            nearest = (miss, new, curves)
    if landed:
        return landed[0][1:] if len(landed) == 1 else measured_pick(ctx, stats, landed, step)
    if beyond is not None and (nearest is None or budget.of(nearest[1]) > band[1]
                               or beyond.dwarfs(nearest[1], tuning.round_to, step)):
        log.info("step %d: no plan near the budget without a disproportionate removal: removing more", step)
        return beyond.plan, beyond.curves
    return nearest[1], nearest[2]


class _Measured:
    """A plan of λ's hull that removes at least the step's budget, against which plans landing
    nearer the target are judged: coarse widths can leave a narrow layer's last channels (a few
    millionths of the MACs) as the only way into the tolerance band, at many times the damage."""

    def __init__(self, ctx: SearchContext, stats: Stats, plan: Plan, curves: dict) -> None:
        self.ctx, self.stats, self.plan, self.curves = ctx, stats, plan, curves
        self.damage: float | None = None

    def dwarfs(self, landed: Plan, multiple: int, step: int) -> bool:
        """Whether ``landed`` measures out of all proportion more damage than this plan."""
        if landed.same(self.plan):
            return False
        if self.damage is None:
            self.damage = self.ctx.damage(self.plan, self.stats)
        d = self.ctx.damage(landed, self.stats)
        if d <= self.ctx.tuning.out_of_proportion * self.damage + self.ctx.tuning.noise_damage:
            return False
        log.info("step %d: the plan on multiples of %d measures damage %.4g, one removing more %.4g",
                 step, multiple, d, self.damage)
        return True


def measured_pick(ctx: SearchContext, stats: Stats, landed: list[tuple[int, Plan, dict]],
                  step: int) -> tuple[Plan, dict]:
    """Of a coarse and a finer grid's landings (multiple, plan, curves), the finer only where
    its measured damage is clearly less (``finer_grid_gain``). Damage predicted by adding units'
    standalone curves misjudges plans that cut several coupled layers deep, as the knapsack's
    combinations on a coarse grid can; the finer plan's in-between widths run no faster than
    the next multiple up, so they must buy fidelity."""
    (m_coarse, coarse_plan, coarse_curves), (m_fine, fine_plan, fine_curves) = landed
    if coarse_plan.same(fine_plan):
        return coarse_plan, coarse_curves
    d_coarse, d_fine = (ctx.damage(p, stats) for p in (coarse_plan, fine_plan))
    log.info("step %d: measured damage %.4g on multiples of %d, %.4g on multiples of %d", step,
             d_coarse, m_coarse, d_fine, m_fine)
    return ((fine_plan, fine_curves) if d_fine < ctx.tuning.finer_grid_gain * d_coarse
            else (coarse_plan, coarse_curves))


def _finer(multiple: int) -> list[int]:
    """``multiple``, then ever finer multiples down to 1."""
    out = [multiple]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def allocate(ctx: SearchContext, plan: Plan, units: list[Unit], grids: list[Grid], multiple: int,
             band: tuple[float, float], step: int) -> tuple[Plan, dict, Plan]:
    """The smallest-damage plan of this step's options on ``grids`` (each unit's amounts at
    multiples of ``multiple``) whose cost lies in ``band``, its curves, and the plan of λ's hull
    before it was landed near the target."""
    a, budget, lat, tuning = ctx.analysis, ctx.budget, ctx.latency, ctx.tuning
    kept, cost_now = plan.kept(), budget.of(plan)
    # Under a MAC budget the latency model still steers *which* MACs go: an option is worth its
    # share of the MACs plus its share of the run time, so of two removals equally harmless the
    # one that buys more speed wins; the budget itself stays exact MACs. Shares of the table's
    # seconds, not of the calibrated total: the live timing behind the calibration varies with
    # the machine's load, and the same command must give the same plan.
    blend = budget.kind == "flops" and lat is not None
    seconds_now, seconds_total = (lat.layers_seconds(kept, plan.ranks), lat.layers_seconds()) if blend else (0.0, 1.0)
    options, savings, appliers, curves = [], [], [], {}
    for u, (grid, apply) in zip(units, grids):
        saving, worth = np.empty(len(grid)), np.empty(len(grid))
        for i, k in enumerate(grid):
            cand = plan.copy()
            apply(cand, k)
            saving[i] = cost_now - budget.of(cand)
            worth[i] = saving[i] / budget.total + (tuning.speed_weight * (
                seconds_now - lat.layers_seconds(cand.kept(), cand.ranks)) / seconds_total if blend else 0.0)
        options.append(interpolate(u.name, u.measured, u.damage, grid, worth, tuning.gamma, u.empties(a, plan)))
        savings.append(saving)
        appliers.append(apply)
        at = np.interp(u.measured, grid, saving) / budget.total
        curves[u.name] = {"removed": [int(k) for k in u.measured], "damage": [float(d) for d in u.damage],
                          "saved_fraction": [float(x) for x in at], "fit_p1_p2": fit_exponential(at, u.damage)}

    def build(choice: list[int]) -> Plan:
        p = plan.copy()
        for apply, opt, c in zip(appliers, options, choice):
            if c:
                apply(p, opt.amounts[c])
        drop_useless_ranks(a, p, lat, budget.kind == "flops")  # pruning may have made a rank useless
        return p

    def cost_of(choice: list[int]) -> float:
        return budget.of(build(choice))

    target = ctx.target(step)
    choice, lam = solve(options, cost_of, target)
    free = give_back(options, choice, cost_of, target)
    choice = land_near(options, free, cost_of, target, ctx.slack())
    # λ's plans are the hull of the units' curves; where the hull steps over the band the exact
    # knapsack finds the combinations between. It charges damage alone: λ from a coarse grid's
    # last jump can be many times the marginal damage, and its speed bonus would outweigh it.
    new = build(settle(savings, [o.damage for o in options], cost_of, cost_now, *band, choice))
    log.info("step %d (multiples of %d): %s cost %.4g -> %.4g (target %.4g), lambda %.3g", step, multiple,
             budget.kind, cost_now, budget.of(new), target, lam)
    return new, curves, build(free)
