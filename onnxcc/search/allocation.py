"""Global Compression Rate Optimization: how much each unit removes, under one budget.

Each unit (a channel group to prune, or a Conv's rank) offers options — remove k more
channels / drop to rank r — each with a measured damage increase ΔD and a saving ΔS of the
budgeted cost (MACs from the exact cost model, or seconds from the latency model).
With one Lagrange multiplier λ every unit independently picks ``argmin ΔD − λ·ΔS``; the joint
plan's cost (interactions included) falls as λ grows, so a scalar root
find on log λ (``scipy.optimize.brentq``) meets the budget. This is CC's single-multiplier
solution of ``min Σ damage s.t. Σ saving = T``, applied to measured rather than fitted curves.

The paper's fitted curve ``p1·exp(p2·x)`` (weighted least squares with √y weights) is computed
for the report; the *remaining compression space* enters as a look-ahead: an option is charged
``(1−γ)·ΔD(k) + γ·ΔD(k⁺)``, the damage it would reach one measured step further, so units that
have no cheap room left beyond this step are not drained first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, brentq, milp
from scipy.sparse import csr_array


@dataclass
class Options:
    """One unit's options; index 0 is 'no change' (ΔD = 0, ΔS = 0)."""

    unit: str
    amounts: np.ndarray      # channels removed / rank chosen, per option
    damage: np.ndarray       # ΔD per option (look-ahead applied)
    saving: np.ndarray       # ΔS (MACs or seconds) per option, standalone


def interpolate(unit: str, measured_k: list[int], measured_d: list[float], k_grid: np.ndarray,
                saving: np.ndarray, gamma: float, last_apart: bool = False) -> Options:
    """Dense options from a few measurements: damage made monotone, linearly interpolated.

    ``last_apart``: the last option (measured last) is a different kind of change, emptying a
    group rather than narrowing it. It is charged its own damage, and the narrowing curve is
    built, look-ahead included, without it: a branch folded to a constant neither bounds nor
    continues the damage of a thinner one."""
    if last_apart:
        body = interpolate(unit, measured_k[:-1], measured_d[:-1], k_grid[:-1], saving[:-1], gamma)
        last = max(float(measured_d[-1]), 0.0) + 1e-9 * max(float(body.damage.max()), float(measured_d[-1]), 1e-6)
        return Options(unit, k_grid, np.append(body.damage, last), saving)
    k = np.asarray([0] + list(measured_k), float)
    d = np.maximum.accumulate(np.maximum(np.asarray([0.0] + list(measured_d)), 0.0))
    dense = np.interp(k_grid, k, d)
    ahead_k = np.interp(k_grid, k[:-1], k[1:]) if len(k) > 1 else k_grid
    ahead = np.interp(ahead_k, k, d)
    charged = (1 - gamma) * dense + gamma * ahead
    # A removal measured as harmless is still not free: a vanishing per-cost charge stops
    # "zero-damage" options from being taken beyond what the budget needs.
    charged = charged + 1e-9 * (saving / max(float(saving.max()), 1.0)) * max(float(d.max()), 1e-6)
    charged[0] = 0.0
    return Options(unit, k_grid, charged, saving)


def choose(options: list[Options], lam: float) -> list[int]:
    return [int(np.argmin(o.damage - lam * o.saving)) for o in options]


def solve(options: list[Options], cost_of: Callable[[list[int]], float], target: float) -> tuple[list[int], float]:
    """Smallest-damage choice whose joint cost (MACs or seconds) is ≤ target (λ by root finding
    on log λ)."""
    scale = max(max(float(o.damage.max()) for o in options), 1e-30) / max(
        max(float(o.saving.max()) for o in options), 1.0)

    def excess(log_lam: float) -> float:
        return cost_of(choose(options, scale * np.exp(log_lam))) - target

    lo, hi = -30.0, 30.0
    if excess(hi) > 0:
        return choose(options, scale * np.exp(hi)), float(scale * np.exp(hi))
    if excess(lo) <= 0:
        return choose(options, scale * np.exp(lo)), float(scale * np.exp(lo))
    # excess is a step function: bracket the last step before the budget is met
    eps = 1e-9 * max(abs(target), 1e-30)
    root = brentq(lambda x: excess(x) - eps, lo, hi, xtol=1e-6)
    for x in (root, root + 1e-5, root + 1e-4, root + 1e-3, root + 1e-2, hi):
        if excess(x) <= 0:
            return choose(options, scale * np.exp(x)), float(scale * np.exp(x))
    return choose(options, scale * np.exp(hi)), float(scale * np.exp(hi))


def give_back(options: list[Options], choice: list[int], cost_of: Callable[[list[int]], float],
              target: float, max_rounds: int = 200) -> list[int]:
    """Undo overshoot: step units back one option while the budget still holds, most damage
    restored first (λ's last jump can remove more than the budget asks)."""
    choice = list(choice)
    for _ in range(max_rounds):
        best, best_gain = None, 0.0
        for i, (o, c) in enumerate(zip(options, choice)):
            if c == 0:
                continue
            trial = choice[:i] + [c - 1] + choice[i + 1:]
            if cost_of(trial) > target:
                continue
            gain = float(o.damage[c] - o.damage[c - 1]) + 1e-12
            if gain > best_gain:
                best, best_gain = trial, gain
        if best is None:
            return choice
        choice = best
    return choice


def land_near(options: list[Options], choice: list[int], cost_of: Callable[[list[int]], float],
              target: float, slack: float, max_moves: int = 20, pairs_checked: int = 8) -> list[int]:
    """Move units one option back or forward while that lands closer to the target, never more
    than ``slack`` above it: where one option of a narrow layer is worth several points of the
    total, the budget-meeting choice can sit far below the target and a plan within the
    tolerance just above it. Where no single move helps, one unit steps back while another
    steps forward (the least added damage first, ranked by the options' standalone savings and
    checked on the joint cost): three channels of one layer for three of another."""
    def closer(trial: list[int], miss: float) -> bool:
        cost = cost_of(trial)
        return cost <= target + slack and abs(cost - target) < miss - 1e-9 * max(abs(target), 1.0)

    best = list(choice)
    for _ in range(max_moves):
        miss = abs(cost_of(best) - target)
        step = next((t for t in _single_moves(options, best) if closer(t, miss)), None)
        if step is None:
            cost = cost_of(best)
            ranked = sorted((dd, i, j) for i, j, dc, dd in _pair_moves(options, best)
                            if abs(cost + dc - target) < miss and cost + dc <= target + slack)
            trials = (_traded(best, i, j) for _, i, j in ranked[:pairs_checked])
            step = next((t for t in trials if closer(t, miss)), None)
        if step is None:
            break
        best = step
    return best


def _single_moves(options: list[Options], ch: list[int]):
    for i, c in enumerate(ch):
        for d in (-1, 1):
            if 0 <= c + d < len(options[i].amounts):
                yield ch[:i] + [c + d] + ch[i + 1:]


def _pair_moves(options: list[Options], ch: list[int]):
    """(i, j, predicted cost change, damage change) for unit i one option back, j one forward."""
    for i, ci in enumerate(ch):
        if ci == 0:
            continue
        oi = options[i]
        back_cost, back_damage = oi.saving[ci] - oi.saving[ci - 1], oi.damage[ci] - oi.damage[ci - 1]
        for j, cj in enumerate(ch):
            oj = options[j]
            if j != i and cj + 1 < len(oj.amounts):
                yield (i, j, float(back_cost - (oj.saving[cj + 1] - oj.saving[cj])),
                       float(oj.damage[cj + 1] - oj.damage[cj] - back_damage))


def _traded(ch: list[int], back: int, forward: int) -> list[int]:
    out = list(ch)
    out[back] -= 1
    out[forward] += 1
    return out


def knapsack(charge: list[np.ndarray], saving: list[np.ndarray], lo: float, hi: float,
             time_limit: float = 20.0) -> list[int] | None:
    """One option per unit, least total ``charge`` with the summed ``saving`` in [lo, hi]: the
    exact multiple-choice knapsack (``scipy.optimize.milp``), or None where no choice fits."""
    sizes = [len(c) for c in charge]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    one_each = csr_array((np.ones(starts[-1]), (np.repeat(np.arange(len(sizes)), sizes), np.arange(starts[-1]))),
                         shape=(len(sizes), starts[-1]))
    scale = max(max(float(np.abs(s).max()) for s in saving), 1e-30)
    res = milp(np.concatenate(charge), integrality=np.ones(starts[-1]), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(np.concatenate(saving)[None] / scale, lo / scale, hi / scale)],
               options={"time_limit": time_limit})
    if res.x is None:
        return None
    return [int(np.argmax(res.x[a:b])) for a, b in zip(starts[:-1], starts[1:])]


def settle(saving: list[np.ndarray], charge: list[np.ndarray], cost_of: Callable[[list[int]], float],
           cost_now: float, low: float, high: float, choice: list[int], rounds: int = 6) -> list[int]:
    """``choice`` if its joint cost lies in [low, high]; else the knapsack's least-charge plan
    that does, or whichever came nearest (see :func:`outside`). The knapsack counts options'
    standalone ``saving`` (additive); the joint cost differs where units share a layer (a Conv
    pruned on both sides), so its band is shifted by the last plan's difference, or widened
    where no sum falls in it, and solved again."""
    best, best_miss = choice, outside(cost_of(choice), low, high)
    shift, widen = 0.0, 0.0
    for _ in range(rounds):
        if best_miss == (False, 0.0):
            break
        trial = knapsack(charge, saving, cost_now - high + shift - widen, cost_now - low + shift + widen)
        if trial is None:   # no sum of standalone savings falls in the band; a wider one's may
            widen = 2 * widen or (high - low) / 2
            continue
        cost = cost_of(trial)
        miss = outside(cost, low, high)
        if miss < best_miss:
            best, best_miss = trial, miss
        shift = cost - (cost_now - sum(float(s[c]) for s, c in zip(saving, trial)))
    return best


def outside(cost: float, low: float, high: float) -> tuple[bool, float]:
    """How far ``cost`` lies from [low, high], for ordering plans: one over the budget
    (``high``) ranks after every plan that meets it."""
    return cost > high, max(low - cost, cost - high, 0.0)


def fit_exponential(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """CC's curve: ln(y) = ln p1 + p2·x by least squares with √y weights (y normalised to max 1)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = (x > 0) & (y > 0)
    if ok.sum() < 2:
        return None
    x, y = x[ok], y[ok] / y[ok].max()
    w = np.sqrt(y)
    A = np.stack([np.ones_like(x), x], 1) * w[:, None]
    coef, *_ = np.linalg.lstsq(A, np.log(y + 1e-10) * w, rcond=None)
    return float(np.exp(coef[0])), float(coef[1])


def faithful_share(curves: dict[str, dict], damage: float) -> float:
    """The largest share of the budget the measured curves (one step's, as the report keeps them)
    say can go while their damages, added up along each unit's lower hull, stay under ``damage``."""
    moves = []   # (damage per share, share, damage) of each hull segment of each unit
    for cv in curves.values():
        pts = sorted(zip([0.0] + list(cv["saved_fraction"]), [0.0] + list(cv["damage"])))
        hull = [pts[0]]
        for p in pts[1:]:
            while len(hull) > 1 and _turns_up(hull[-2], hull[-1], p):
                hull.pop()
            if p[0] > hull[-1][0] and p[1] >= hull[-1][1] - 1e-12:
                hull.append(p)
        moves += [((d1 - d0) / (s1 - s0), s1 - s0, d1 - d0) for (s0, d0), (s1, d1) in zip(hull, hull[1:])]
    share = spent = 0.0
    for _, ds, dd in sorted(moves):
        if spent + dd > damage:
            return share + ds * max(0.0, damage - spent) / dd if dd > 0 else share
        share, spent = share + ds, spent + dd
    return share


def _turns_up(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> bool:
    """Whether b lies on or above the segment from a to c (so it is not on the lower hull)."""
    return (b[1] - a[1]) * (c[0] - a[0]) >= (c[1] - a[1]) * (b[0] - a[0])
