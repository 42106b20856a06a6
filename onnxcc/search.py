"""The multi-step search for a plan: measure → allocate, step by step.

Over ``steps`` steps the budget is approached gradually; each step re-measures every unit's
damage curve on the *partly compressed* model (emulated by weights fed to one onnxruntime
session), re-scores channels with the current activations, and re-solves the global allocation
for that step's target. With the latency model a rank is only offered where the SVD pair runs
faster than the dense Conv it replaces, at the widths of that moment, and dropped at the end
where pruning made it slower.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Protocol

import numpy as np

from .allocate import fit_exponential, give_back, interpolate, land_near, outside, settle, solve
from .analysis.groups import Analysis
from .config import Budget, CompressConfig, Progress
from .errors import TargetUnreachableError
from .latency_model import LatencyModel
from .sensitivity import Plan, Stats, WeightProbe, affected_layers, channel_scores, plan_weights

log = logging.getLogger(__name__)


def _min_keep(cfg: CompressConfig, size: int) -> int:
    return max(1, int(np.ceil(cfg.min_keep * size)))


def _extreme_plan(a: Analysis, cfg: CompressConfig) -> Plan:
    plan = Plan()
    if cfg.method in ("cc", "prune"):
        for gid, g in a.groups.items():
            if g.prunable:
                m = np.zeros(g.size, bool)
                if not g.droppable:
                    m[:min(g.size, _allowed(_min_keep(cfg, g.size), g.size, cfg.round_to, g.size)[0])] = True
                plan.keep[gid] = m
    if cfg.method in ("cc", "decompose"):
        plan.ranks = {l.key: int(_allowed(1, l.max_useful_rank(), cfg.round_to, l.max_useful_rank())[0])
                      for l in a.layers if l.factorizable}
    return plan


def check_reachable(a: Analysis, cfg: CompressConfig, budget: Budget) -> None:
    extreme = _extreme_plan(a, cfg)
    best = min(budget.of(extreme), budget.of(Plan(extreme.keep)))  # rank-1 pairs may be slow
    if best > budget.target():
        reach = 1 - best / budget.total
        what = "MACs" if budget.kind == "flops" else "predicted latency"
        raise TargetUnreachableError(
            f"--{budget.kind} {budget.fraction} is out of reach for this model with --method {cfg.method}: "
            f"at most {reach:.3f} of its {what} can be removed")


def _remove_lowest(mask: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    m = mask.copy()
    if k > 0:
        live = np.flatnonzero(m)
        m[live[np.argsort(scores[live], kind="stable")[:k]]] = False
    return m


def _allowed(lo: int, hi: int, multiple: int, size: int) -> np.ndarray:
    """Counts in [lo, hi] the backend runs well: multiples of ``multiple``, except for a channel
    group or rank range (of ``size``) that never reached one: below a block, a width costs
    nearly as much as the whole block and runs unblocked."""
    if hi < lo:
        return np.zeros(0, int)
    if size <= multiple:
        return np.arange(lo, hi + 1)
    return np.arange(max(lo + (-lo) % multiple, multiple), hi + 1, multiple)


def _thin(grid: np.ndarray, most: int = 65) -> np.ndarray:
    """At most ``most`` options (first and last kept): savings are exact at each, damage is
    interpolated between measurements anyway."""
    if len(grid) <= most:
        return grid
    return grid[np.unique(np.round(np.linspace(0, len(grid) - 1, most)).astype(int))]


def emulate(probe: WeightProbe, plan: Plan, prev: dict[str, np.ndarray],
            reconstruct: bool) -> tuple[dict[str, np.ndarray], Stats, float | None]:
    """The plan's weights, refit from layer-input statistics under ``prev``; the statistics; and
    the weights' damage where telling refit from plain removal measured it (else None).

    Refits that make the outputs worse than plain removal are dropped: a tiny network's few
    calibration rows can make the least-squares problem ill-posed (weights 10x the original's,
    outputs off by orders of magnitude). They are judged on the sensitivity samples, which the
    refits never see."""
    stats = probe.statistics(prev, set(probe.views) if reconstruct else set())
    weights = plan_weights(probe, plan, stats)
    if not stats.moments or not (plan.keep or plan.ranks):
        return weights, stats, None
    plain_stats = Stats(stats.energy, {}, stats.rows)
    plain = plan_weights(probe, plan, plain_stats)
    refit_damage, plain_damage = probe.damage(weights), probe.damage(plain)
    if plain_damage < refit_damage:
        log.info("least-squares refits dropped: output error %.4g with them, %.4g without",
                 refit_damage, plain_damage)
        return plain, plain_stats, plain_damage
    return weights, stats, refit_damage


class StepStore(Protocol):
    """Where a search keeps its finished steps (:class:`onnxcc.resume.SearchCheckpoint`, per search)."""

    def step(self, step: int) -> tuple[Plan, dict, dict[str, np.ndarray]] | None: ...

    def save_step(self, step: int, plan: Plan, curves: dict, weights: dict[str, np.ndarray]) -> None: ...


TARGET_TOLERANCE = 0.004   # share of the total the last step may fall short by (twice it beyond) before grids get finer
STEP_OVERSHOOT = 0.5       # share of a step's budget a step before the last may remove beyond it
FINER_GRID_GAIN = 0.8      # a finer grid's plan must measure at most this share of a coarser one's damage
OUT_OF_PROPORTION = 2.0    # a plan landing on the budget may measure this many times the damage of one beyond it ...
NOISE_DAMAGE = 0.005       # ... plus this much, before removing more than asked wins
COMPOUNDING = 3.0          # a step's plan may measure this many times its units' summed damage (+ NOISE_DAMAGE) ...
BACKOFF_SUSPECTS = 8       # ... before its most damaging units are undone one at a time to find the one to leave out


@dataclass
class _Unit:
    """One compression unit of a step: a channel group to prune or a Conv's rank."""

    kind: str                         # "prune" | "rank"
    unit: Any                         # group id | Layer
    touched: set[str]                 # layer keys whose emulated weights depend on it
    measured: list[int] = field(default_factory=list)   # amounts removed where damage was measured
    damage: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"group:{self.unit}" if self.kind == "prune" else f"rank:{self.unit.key}"


def _grid(a: Analysis, plan: Plan, cfg: CompressConfig, budget: Budget, lat: LatencyModel | None,
          scores: dict[int, np.ndarray], unit: _Unit, multiple: int) -> tuple[np.ndarray, Callable[[Plan, int], None]]:
    """The amounts ``unit`` may remove at this step (0 first), keeping widths or ranks at
    multiples of ``multiple``, and how to apply an amount to a plan."""
    kept = plan.kept()
    if unit.kind == "prune":
        gid, g = unit.unit, a.groups[unit.unit]
        n = kept.get(gid, g.size)
        mask = plan.keep.get(gid, np.ones(g.size, bool))
        remaining = _allowed(_min_keep(cfg, g.size), n - 1, multiple, g.size)
        if g.droppable and n > 0:
            remaining = np.append(0, remaining)   # emptied: the branch folds to a constant

        def prune(p: Plan, k: int) -> None:
            p.keep[gid] = _remove_lowest(mask, scores[gid], int(k))
        return _thin(np.array([0] + sorted(n - remaining), int)), prune
    layer = unit.unit
    cin, cout = a.channels(layer, kept)
    if layer.key in a.dead(kept) or not (cin and cout):   # folded away by an emptied group
        return np.zeros(1, int), lambda p, k: None
    current = plan.ranks.get(layer.key)
    upper = layer.max_useful_rank(cin, cout) if current is None else current - 1
    start = upper + 1 if current is None else current
    ranks = _allowed(1, upper, multiple, layer.max_useful_rank())
    if lat is not None:
        ranks = ranks[[_pays(a, lat, layer, kept, int(r), budget.kind == "flops") for r in ranks]]

    def factorize(p: Plan, k: int) -> None:
        if k > 0:
            p.ranks[layer.key] = int(start - k)
    return _thin(np.array([0] + sorted(start - ranks), int)), factorize


# Searches whose unit measurements cost less than this (MACs per sample × units) are run three
# times, up to three times this twice, beyond it once: see :func:`tries_for`.
CHEAP_SEARCH = 50e9


def tries_for(a: Analysis, cfg: CompressConfig, samples: int) -> int:
    """How many searches on rotated calibration splits a model gets by default. Per-model
    fidelity swings with small changes of the plan (ddddocr's OCR net: judge cosine 0.78 from one
    split, 0.92 from two others), and the plans' damage measured on all calibration samples
    picked the best or a tied best of three splits on six real models; where a search is cheap,
    two more are worth their time. The cost is a deterministic proxy (MACs per sample times
    units), not a timing, so a command gives the same plan under any load. With no more
    ``samples`` than one damage measurement takes, every split is the same: one search."""
    if samples <= cfg.sens_samples:
        return 1
    if cfg.tries is not None:
        return cfg.tries
    work = a.total_macs * len(_units(a, cfg))
    return 3 if work <= CHEAP_SEARCH else 2 if work <= 3 * CHEAP_SEARCH else 1


# Whole runs of the sensitivity samples a step makes besides its units' candidates: its base,
# the landing and compounding checks, the statistics and channel scores of the step's weights.
STEP_RUNS = 8


def estimate_seconds(a: Analysis, cfg: CompressConfig, run_seconds: float, workers: int = 1) -> float:
    """One search's measuring time, predicted before it starts from the cost proxy: each step
    measures every unit at one amount per fraction of ``cfg.fractions`` (and emptying, where a
    unit may empty its branch), a candidate running the samples through the part of the network
    its layers reach (the share of the MACs from its first layer on); ``run_seconds``: one whole
    run of the sensitivity samples. Emulation and refits are not in the proxy; the report puts
    the estimate beside the time taken."""
    macs = np.array([a.layer_macs(l, {}) for l in a.layers], float)
    reach = np.cumsum(macs[::-1])[::-1] / max(macs.sum(), 1.0)   # share of the MACs from layer i on
    order = {l.key: i for i, l in enumerate(a.layers)}
    runs = 0.0
    for u in _units(a, cfg):
        amounts = len(cfg.fractions) + (u.kind == "prune" and a.groups[u.unit].droppable)
        runs += amounts * reach[min((order[k] for k in u.touched if k in order), default=0)]
    return cfg.steps * (runs / workers + STEP_RUNS) * run_seconds


STEPS = 3              # multi-step removal where the search's time allows ...
SENS_SAMPLES = 16      # ... on this many samples per damage measurement,
FEWEST_SAMPLES = 8     # down to this many where even one step on SENS_SAMPLES would not fit


@dataclass(frozen=True)
class SearchSize:
    """The steps and samples per measurement a search gets, and what it is estimated to take."""

    steps: int
    sens_samples: int
    estimated_seconds: float   # one search's measuring, at these settings
    asked_seconds: float       # ... and at the full settings, had the user left both open


def size_search(a: Analysis, cfg: CompressConfig, sample_seconds: float, samples: int, workers: int = 1) -> SearchSize:
    """Steps and samples per measurement for the settings the user left open (None): the most
    steps, then the most samples, whose estimated measuring time fits ``cfg.search_seconds``;
    the cheapest where none fits. ``sample_seconds``: one sample's run through the model;
    ``samples``: calibration samples there are to measure on. Deterministic given the timing,
    which a resumed run reads back, so a resumed search sizes itself as the killed one did."""
    steps = [cfg.steps] if cfg.steps is not None else list(range(STEPS, 0, -1))
    counts = [cfg.sens_samples] if cfg.sens_samples is not None else [SENS_SAMPLES, FEWEST_SAMPLES]
    rungs = [(st, min(n, samples)) for n in counts for st in steps]

    def estimate(st: int, n: int) -> float:
        return estimate_seconds(a, replace(cfg, steps=st), sample_seconds * n, workers)

    fits = [r for r in rungs if estimate(*r) <= cfg.search_seconds]
    st, n = fits[0] if fits else rungs[-1]
    return SearchSize(st, n, estimate(st, n), estimate(*rungs[0]))


def _units(a: Analysis, cfg: CompressConfig) -> list[_Unit]:
    units = []
    if cfg.method in ("cc", "prune"):
        units += [_Unit("prune", gid, affected_layers(a, gid)) for gid, g in a.groups.items() if g.prunable]
    if cfg.method in ("cc", "decompose"):
        units += [_Unit("rank", l, affected_layers(a, l.key)) for l in a.layers if l.factorizable]
    return units


def search_plan(a: Analysis, probe: WeightProbe, cfg: CompressConfig, budget: Budget, lat: LatencyModel | None,
                progress: Progress | None, steps: StepStore | None = None) -> tuple[Plan, list[dict], dict[str, np.ndarray]]:
    """One multi-step search: the plan, each step's damage curves, and the weights that emulate
    the plan, refit once more with statistics of the final plan. With ``steps``, each finished
    step is saved there, and steps saved by an earlier run are read back instead of measured."""
    plan, curves, weights = Plan(), [], {}
    for step in range(1, cfg.steps + 1):
        saved = steps.step(step) if steps else None
        if saved is not None:
            plan, step_curves, weights = saved
        else:
            plan, step_curves = _take_step(a, probe, plan, weights, cfg, budget, lat, step, progress)
            weights = emulate(probe, plan, weights, cfg.reconstruct)[0]
            if steps:
                steps.save_step(step, plan, step_curves, weights)
        curves.append(step_curves)
    _drop_useless_ranks(a, plan, lat, strict=budget.kind == "flops")
    return plan, curves, emulate(probe, plan, weights, cfg.reconstruct)[0]


def _take_step(a: Analysis, probe: WeightProbe, plan: Plan, prev: dict[str, np.ndarray], cfg: CompressConfig,
               budget: Budget, lat: LatencyModel | None, step: int, progress: Progress | None) -> tuple[Plan, dict]:
    target = budget.target(step / cfg.steps)
    weights, stats, base = emulate(probe, plan, prev, cfg.reconstruct)
    if base is None:
        base = probe.damage(weights) if (plan.keep or plan.ranks) else 0.0
    scores = channel_scores(probe, plan, weights, stats)
    probe.forget_svds()  # this step's weights and statistics differ from the last
    units = _units(a, cfg)
    coarse = [(u, *_grid(a, plan, cfg, budget, lat, scores, u, cfg.round_to)) for u in units]
    coarse = [(u, grid, apply) for u, grid, apply in coarse if len(grid) > 1]
    units = [u for u, _, _ in coarse]
    for u, grid, _ in coarse:
        u.measured = _measure_at(grid, cfg.fractions, _empties(a, plan, u))

    jobs = [(u, apply, k) for u, _, apply in coarse for k in u.measured]

    def candidate(u: _Unit, apply: Callable[[Plan, int], None], k: int) -> dict[str, np.ndarray]:
        cand = plan.copy()
        apply(cand, k)
        return plan_weights(probe, cand, stats, u.touched)

    done = iter(range(1, len(jobs) + 1))

    def tick() -> None:
        if progress:
            progress(f"step {step}/{cfg.steps}: measuring", next(done), len(jobs))
    damages = probe.damages(weights, [(u.touched, partial(candidate, u, apply, k)) for u, apply, k in jobs], tick)
    for (u, _, _), d in zip(jobs, damages):
        u.damage.append(d - base)
    if not units:
        return plan, {}

    new, curves = _land(a, probe, stats, plan, cfg, budget, lat, scores, coarse, target, step)
    culprit, damage = _compounding(a, probe, stats, plan, new, units, base, step)
    rest = [c for c in coarse if c[0] is not culprit]
    if culprit is None or not rest:
        return new, curves
    other = _land(a, probe, stats, plan, cfg, budget, lat, scores, rest, target, step)[0]
    d_other = probe.damage(plan_weights(probe, other, stats))
    log.info("step %d: without %s the plan measures damage %.4g (%.4g with it)", step, culprit.name, d_other, damage)
    return (other if d_other < damage and budget.of(other) <= budget.of(new) + TARGET_TOLERANCE * budget.total
            else new), curves


def _land(a: Analysis, probe: WeightProbe, stats: Stats, plan: Plan, cfg: CompressConfig, budget: Budget,
          lat: LatencyModel | None, scores: dict[int, np.ndarray], coarse: list, target: float,
          step: int) -> tuple[Plan, dict]:
    """This step's plan from the units' measured curves (``coarse``: unit, grid, apply)."""
    units = [u for u, _, _ in coarse]
    # The budget is met on the backend-friendly grid when it can be; where its steps are too
    # coarse to land (narrow layers, small models), the same measurements are interpolated on
    # finer grids, down to single channels. Steps before the last may remove up to
    # STEP_OVERSHOOT of a step more than their share (the next step re-measures and takes
    # less); the last must land within the tolerance.
    slack = TARGET_TOLERANCE * budget.total
    over = 0.0 if step == cfg.steps else STEP_OVERSHOOT
    band = (min(target - 2 * slack, budget.target((step + over) / cfg.steps)), target + slack)
    landed, nearest, beyond = [], None, None
    for multiple in _finer(cfg.round_to):
        grids = ([(grid, apply) for _, grid, apply in coarse] if multiple == cfg.round_to
                 else [_grid(a, plan, cfg, budget, lat, scores, u, multiple) for u in units])
        new, curves, free = _allocate(a, plan, cfg, budget, lat, units, grids, multiple, band, target, step)
        if beyond is None and budget.of(free) <= band[1]:
            beyond = _Measured(probe, stats, free, curves)
        miss = outside(budget.of(new), *band)
        if miss == (False, 0.0) and not (beyond and beyond.dwarfs(new, multiple, step)):
            landed.append((multiple, new, curves))
            if len(landed) == 2:
                break
        elif miss != (False, 0.0) and (nearest is None or miss < nearest[0]):
            nearest = (miss, new, curves)
    if landed:
        return landed[0][1:] if len(landed) == 1 else _measured_pick(probe, stats, landed, step)
    if beyond is not None and (nearest is None or budget.of(nearest[1]) > band[1]
                               or beyond.dwarfs(nearest[1], cfg.round_to, step)):
        log.info("step %d: no plan near the budget without a disproportionate removal: removing more", step)
        return beyond.plan, beyond.curves
    return nearest[1], nearest[2]


def _compounding(a: Analysis, probe: WeightProbe, stats: Stats, plan: Plan, new: Plan, units: list[_Unit],
                 base: float, step: int) -> tuple[_Unit | None, float]:
    """The unit to leave out of this step, where the plan measures far more damage than its units'
    curves add up to: removals that each cost little can together break a layer (the last
    channels of a narrow hidden layer behind several thinned ones). Each changed unit, most
    damaging first, is undone in turn; the one whose undoing lowers the damage most is it."""
    changed = [(u, k) for u in units if (k := _amount(a, plan, new, u)) > 0]
    if len(changed) < 2:
        return None, 0.0
    predicted = base + sum(float(np.interp(k, [0] + u.measured, [0.0] + u.damage)) for u, k in changed)
    measured = probe.damage(plan_weights(probe, new, stats))
    if measured <= COMPOUNDING * max(predicted, 0.0) + NOISE_DAMAGE:
        return None, measured
    suspects = sorted(changed, key=lambda c: -float(np.interp(c[1], [0] + c[0].measured, [0.0] + c[0].damage)))
    undone = [(probe.damage(plan_weights(probe, _undo(plan, new, u), stats)), i, u)
              for i, (u, _) in enumerate(suspects[:BACKOFF_SUSPECTS])]
    best, _, culprit = min(undone)
    log.info("step %d: the plan measures damage %.4g where its units' curves add up to %.4g; undoing %s: "
             "%.4g; allocating again without it", step, measured, predicted, culprit.name, best)
    return culprit, measured


def _amount(a: Analysis, before: Plan, after: Plan, u: _Unit) -> int:
    """How much ``u`` removes going from ``before`` to ``after`` (channels, or rank steps)."""
    if u.kind == "prune":
        size = a.groups[u.unit].size
        return before.kept().get(u.unit, size) - after.kept().get(u.unit, size)
    key = u.unit.key
    if key not in after.ranks:
        return 0
    start = before.ranks.get(key, u.unit.max_useful_rank(*a.channels(u.unit, before.kept())) + 1)
    return start - after.ranks[key]


def _undo(before: Plan, after: Plan, u: _Unit) -> Plan:
    """``after`` with ``u`` as it was in ``before``."""
    p = after.copy()
    store, key = (p.keep, u.unit) if u.kind == "prune" else (p.ranks, u.unit.key)
    old = before.keep.get(key) if u.kind == "prune" else before.ranks.get(key)
    if old is None:
        store.pop(key, None)
    else:
        store[key] = old.copy() if u.kind == "prune" else old
    return p


class _Measured:
    """A plan of λ's hull that removes at least the step's budget, against which plans landing
    nearer the target are judged: coarse widths can leave a narrow layer's last channels (a few
    millionths of the MACs) as the only way into the tolerance band, at many times the damage."""

    def __init__(self, probe: WeightProbe, stats: Stats, plan: Plan, curves: dict) -> None:
        self.probe, self.stats, self.plan, self.curves = probe, stats, plan, curves
        self.damage: float | None = None

    def dwarfs(self, landed: Plan, multiple: int, step: int) -> bool:
        """Whether ``landed`` measures out of all proportion more damage than this plan."""
        if (landed.kept(), landed.ranks) == (self.plan.kept(), self.plan.ranks):
            return False
        if self.damage is None:
            self.damage = self.probe.damage(plan_weights(self.probe, self.plan, self.stats))
        d = self.probe.damage(plan_weights(self.probe, landed, self.stats))
        if d <= OUT_OF_PROPORTION * self.damage + NOISE_DAMAGE:
            return False
        log.info("step %d: the plan on multiples of %d measures damage %.4g, one removing more %.4g",
                 step, multiple, d, self.damage)
        return True


def _empties(a: Analysis, plan: Plan, u: _Unit) -> bool:
    """Whether the largest amount on ``u``'s grid empties its group (see :func:`_grid`)."""
    if u.kind != "prune" or not a.groups[u.unit].droppable:
        return False
    mask = plan.keep.get(u.unit)
    return mask is None or bool(mask.any())


def _measure_at(grid: np.ndarray, fractions: tuple[float, ...], emptying: bool) -> list[int]:
    """The amounts of ``grid`` (0 first) whose damage is measured: the ones nearest each fraction
    of the largest. Emptying a group is a different kind of change from narrowing it (a folded
    branch, not a thinner one), so where the last amount empties, the fractions place themselves
    on the widths before it and emptying is measured besides: interpolating from emptying would
    price the narrowest widths by a damage they do not have."""
    widths = grid[1:-1] if emptying else grid[1:]
    picked = {int(widths[np.argmin(np.abs(widths - f * widths[-1]))]) for f in fractions} if len(widths) else set()
    return sorted(picked | ({int(grid[-1])} if emptying else set()))


def _measured_pick(probe: WeightProbe, stats: Stats, landed: list[tuple[int, Plan, dict]],
                   step: int) -> tuple[Plan, dict]:
    """Of a coarse and a finer grid's landings (multiple, plan, curves), the finer only where
    its measured damage is clearly less. Damage predicted by adding units' standalone curves
    misjudges plans that cut several coupled layers deep, as the knapsack's combinations on a
    coarse grid can; the finer plan's in-between widths run no faster than the next multiple
    up, so they must buy fidelity."""
    (m_coarse, coarse_plan, coarse_curves), (m_fine, fine_plan, fine_curves) = landed
    if (coarse_plan.kept(), coarse_plan.ranks) == (fine_plan.kept(), fine_plan.ranks):
        return coarse_plan, coarse_curves
    d_coarse, d_fine = (probe.damage(plan_weights(probe, p, stats)) for p in (coarse_plan, fine_plan))
    log.info("step %d: measured damage %.4g on multiples of %d, %.4g on multiples of %d", step,
             d_coarse, m_coarse, d_fine, m_fine)
    return (fine_plan, fine_curves) if d_fine < FINER_GRID_GAIN * d_coarse else (coarse_plan, coarse_curves)


def _finer(multiple: int) -> list[int]:
    """``multiple``, then ever finer multiples down to 1."""
    out = [multiple]
    while out[-1] > 1:
        out.append(max(1, out[-1] // 2))
    return out


def _allocate(a: Analysis, plan: Plan, cfg: CompressConfig, budget: Budget, lat: LatencyModel | None,
              units: list[_Unit], grids: list[tuple[np.ndarray, Callable[[Plan, int], None]]], multiple: int,
              band: tuple[float, float], target: float, step: int) -> tuple[Plan, dict]:
    """The smallest-damage plan of this step's options on ``grids`` (each unit's amounts at
    multiples of ``multiple``, see :func:`_grid`) whose cost lies in ``band``, and its curves."""
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
            worth[i] = saving[i] / budget.total + (cfg.speed_weight * (
                seconds_now - lat.layers_seconds(cand.kept(), cand.ranks)) / seconds_total if blend else 0.0)
        options.append(interpolate(u.name, u.measured, u.damage, grid, worth, cfg.gamma, _empties(a, plan, u)))
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
        _drop_useless_ranks(a, p, lat, budget.kind == "flops")  # pruning may have made a rank useless
        return p

    def cost_of(choice: list[int]) -> float:
        return budget.of(build(choice))

    choice, lam = solve(options, cost_of, target)
    free = give_back(options, choice, cost_of, target)
    choice = land_near(options, free, cost_of, target, TARGET_TOLERANCE * budget.total)
    # λ's plans are the hull of the units' curves; where the hull steps over the band the exact
    # knapsack finds the combinations between. It charges damage alone: λ from a coarse grid's
    # last jump can be many times the marginal damage, and its speed bonus would outweigh it.
    new = build(settle(savings, [o.damage for o in options], cost_of, cost_now, *band, choice))
    log.info("step %d (multiples of %d): %s cost %.4g -> %.4g (target %.4g), lambda %.3g", step, multiple,
             budget.kind, cost_now, budget.of(new), target, lam)
    return new, curves, build(free)


def _pays(a: Analysis, lat: LatencyModel, layer, kept: dict[int, int], rank: int, strict: bool) -> bool:
    """Is the SVD pair at ``rank`` faster than the dense layer at these widths? ``strict`` (MAC
    budgets): faster than the dense layer would be with the pair's MACs, i.e. at least as fast
    per MAC — otherwise pruning the same MACs elsewhere buys more speed, and under a MAC budget
    that is the alternative."""
    dense = lat.layer_seconds(layer, kept)
    if strict:
        dense *= a.layer_macs(layer, kept, rank) / max(a.layer_macs(layer, kept), 1.0)
    return lat.layer_seconds(layer, kept, rank) < dense


def _drop_useless_ranks(a: Analysis, plan: Plan, lat: LatencyModel | None = None, strict: bool = False) -> None:
    """A rank that no longer saves MACs on the pruned layer — or, with the latency model, runs
    slower than the dense layer — would only add a conv: drop it."""
    kept = plan.kept()
    for key in list(plan.ranks):
        layer = a.layer(key)
        slower = lat is not None and not _pays(a, lat, layer, kept, plan.ranks[key], strict)
        if slower or a.layer_macs(layer, kept, plan.ranks[key]) >= a.layer_macs(layer, kept):
            del plan.ranks[key]
