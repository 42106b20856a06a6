"""The multi-step search for a plan: measure → allocate, step by step.

Over ``steps`` steps the budget is approached gradually; each step re-measures every unit's
damage curve on the *partly compressed* model (emulated by weights fed to one onnxruntime
session), re-scores channels with the current activations, and re-solves the global allocation
for that step's target (:mod:`.step`). With the latency model a rank is only offered where the
SVD pair runs faster than the dense Conv it replaces, at the widths of that moment, and dropped
at the end where pruning made it slower.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .context import SearchContext
from .emulation import emulate, layer_statistics
from .plan import Plan, drop_useless_ranks
from .step import take_step


class StepStore(Protocol):
    """Where a search keeps its finished steps (:class:`onnxcc.resume.SearchCheckpoint`, per search)."""

    def step(self, step: int) -> tuple[Plan, dict, dict[str, np.ndarray]] | None: ...

    def save_step(self, step: int, plan: Plan, curves: dict, weights: dict[str, np.ndarray]) -> None: ...


def search_plan(ctx: SearchContext, steps: StepStore | None = None) -> tuple[Plan, list[dict], dict[str, np.ndarray]]:
    """One multi-step search: the plan, each step's damage curves, and the weights that emulate
    the plan, refit once more with statistics of the final plan. With ``steps``, each finished
    step is saved there, and steps saved by an earlier run are read back instead of measured."""
    probe, reconstruct = ctx.probe, ctx.tuning.reconstruct
    plan, curves, weights = Plan(), [], {}
    for step in range(1, ctx.tuning.steps + 1):
        saved = steps.step(step) if steps else None
        if saved is not None:
            plan, step_curves, weights = saved
        else:
            # one pass of the statistics serves the step's base and its new plan: both are
            # refit to the inputs the weights so far give
            stats = layer_statistics(probe, weights, reconstruct)
            plan, step_curves = take_step(ctx, plan, stats, step)
            weights = emulate(probe, plan, stats)[0]
            del stats   # freed before the next step computes its own: the second moments are big
            if steps:
                steps.save_step(step, plan, step_curves, weights)
        curves.append(step_curves)
    drop_useless_ranks(ctx.analysis, plan, ctx.latency, strict=ctx.budget.kind == "flops")
    return plan, curves, emulate(probe, plan, layer_statistics(probe, weights, reconstruct))[0]
