"""What one search works with: its tunables, and the model, probe and budget it searches over."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from ..analysis.groups import Analysis
from ..config import Budget, CompressConfig, Progress
from ..errors import UsageError
from .emulation import plan_weights
from .plan import Plan
from .probe import WeightProbe
from .statistics import Stats

if TYPE_CHECKING:
    from ..latency_model import LatencyModel

# The settings a search takes from CompressConfig (the rest of SearchTuning is internal).
FROM_CONFIG = ("method", "steps", "fractions", "round_to", "min_keep", "gamma", "speed_weight", "reconstruct")


@dataclass(frozen=True)
class SearchTuning:
    """The search's tunables: the user's settings (from :class:`~onnxcc.config.CompressConfig`)
    and the thresholds by which a step lands its plan (``CompressConfig.search_overrides``
    changes them by name)."""

    # the config's defaults where it has one; steps and round_to are left open there (sized, measured)
    method: str = CompressConfig.method
    steps: int = 3                    # the most steps sizing gives
    fractions: tuple[float, ...] = CompressConfig.fractions
    round_to: int = 16                # where no latency model measures the machine's best multiple
    min_keep: float = 0.25            # where the config leaves it to the target: keep_floor()
    gamma: float = CompressConfig.gamma
    speed_weight: float = CompressConfig.speed_weight
    reconstruct: bool = CompressConfig.reconstruct
    target_tolerance: float = 0.004   # share of the total the last step may fall short by (twice it beyond) before grids get finer
    step_overshoot: float = 0.5       # share of a step's budget a step before the last may remove beyond it
    finer_grid_gain: float = 0.8      # a finer grid's plan must measure at most this share of a coarser one's damage
    out_of_proportion: float = 2.0    # a plan landing on the budget may measure this many times the damage of one beyond it ...
    noise_damage: float = 0.005       # ... plus this much, before removing more than asked wins
    compounding: float = 3.0          # a step's plan may measure this many times its units' summed damage (+ noise_damage) ...
    backoff_suspects: int = 8         # ... before its most damaging units are undone one at a time to find the one to leave out
    cheap_search: float = 50e9        # MACs per sample × units below which a model gets three searches (see sizing.tries_for)
    flat_share: float = 0.05          # a unit measuring under this share of the median unit at its widest is measured there alone

    @classmethod
    def of(cls, cfg: CompressConfig) -> "SearchTuning":
        """The tuning ``cfg`` asks for; its steps and round_to must be settled (sized, measured)."""
        names = {f.name for f in fields(cls)}
        unknown = set(cfg.search_overrides) - (names - set(FROM_CONFIG))
        if unknown:
            raise UsageError(f"unknown search override(s): {', '.join(sorted(unknown))}")
        settings = {name: getattr(cfg, name) for name in FROM_CONFIG if getattr(cfg, name) is not None}
        if cfg.min_keep is None:
            settings["min_keep"] = keep_floor(cfg.removal)
        return replace(cls(), **settings, **cfg.search_overrides)


def keep_floor(fraction: float) -> float:
    """The share of its channels every group keeps at least, for a target removing ``fraction``:
    a half, less only for the deepest cuts (1 - fraction, down to a quarter at 75%), which a half
    would put out of reach or leave no room to choose. Narrower groups measure little damage alone
    but leave recovery too little to work with. MobileNetV2 after recovery, top-1 agreement on 50
    unseen photos (tools/bench_compress.py --recovery): --flops 0.3, a half 84-88% (cosine 0.89-0.90)
    against 78% with a quarter; --flops 0.5, a half 38% (cosine 0.67) against 26% (0.63);
    EfficientNet-Lite0 --flops 0.3, a half 92% (cosine 0.855) against 82% (0.854) on the code
    before. (A floor of 5% cut a 320-channel bottleneck to 16 at --flops 0.5: 0%.)"""
    return float(np.clip(1 - fraction, 0.25, 0.5))


@dataclass
class SearchContext:
    """One search's model, probe, budget and tunables, passed as one (the latency model, where a
    budget or the speed bonus prices layers by time)."""

    analysis: Analysis
    probe: WeightProbe
    budget: Budget
    tuning: SearchTuning
    latency: LatencyModel | None = None
    progress: Progress | None = None

    def damage(self, plan: Plan, stats: Stats) -> float:
        """The damage of ``plan``'s weights emulated with ``stats``."""
        return self.probe.damage(plan_weights(self.probe, plan, stats))

    def slack(self) -> float:
        """How far from its target a landing may fall, in the budget's units."""
        return self.tuning.target_tolerance * self.budget.total

    def target(self, step: int) -> float:
        """The cost a plan should have after ``step`` of ``tuning.steps``."""
        return self.budget.target(step / self.tuning.steps)
