"""How big a search a model gets: its estimated time, its steps and samples, its tries.

All of it from a deterministic cost proxy (the MACs each unit's candidates run through) and one
timed sample, so a command gives the same plan under any load and a resumed run sizes itself as
the killed one did.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..analysis.groups import Analysis
from ..config import CompressConfig
from .context import SearchTuning
from .plan import units

STEPS = SearchTuning.steps   # multi-step removal where the search's time allows ...
SENS_SAMPLES = 16            # ... on this many samples per damage measurement,
FEWEST_SAMPLES = 8           # down to this many before fewer steps
# Whole runs of the sensitivity samples a step makes besides its units' candidates: its base,
# the landing and compounding checks, the statistics and channel scores of the step's weights.
STEP_RUNS = 8


def tries_for(a: Analysis, cfg: CompressConfig, samples: int) -> int:
    """How many searches on rotated calibration splits a model gets (``cfg.tries``, where given).
    Per-model fidelity swings with small changes of the plan (ddddocr's OCR net: judge cosine
    0.78 from one split, 0.92 from two others), and the plans' damage measured on all calibration
    samples picked the best or a tied best of three splits on six real models; where a search is
    cheap (MACs per sample times units under the tuning's ``cheap_search``; up to three times
    it: two), two more are worth their time. With no more ``samples`` than one damage
    measurement takes (``cfg.sens_samples``), every split is the same: one search."""
    if samples <= cfg.sens_samples:
        return 1
    if cfg.tries is not None:
        return cfg.tries
    tuning = SearchTuning.of(cfg)
    work = a.total_macs * len(units(a, tuning.method))
    return 3 if work <= tuning.cheap_search else 2 if work <= 3 * tuning.cheap_search else 1


def estimate_seconds(a: Analysis, tuning: SearchTuning, run_seconds: float, workers: int = 1) -> float:
    """One search's measuring time, predicted before it starts from the cost proxy: each step
    measures every unit at one amount per fraction of ``tuning.fractions`` (and emptying, where a
    unit may empty its branch), a candidate running the samples through the part of the network
    its layers reach (the share of the MACs from its first layer on); ``run_seconds``: one whole
    run of the sensitivity samples. Emulation and refits are not in the proxy, and units found
    flat measure fewer amounts than it counts; the report puts the estimate beside the time taken."""
    macs = np.array([a.layer_macs(l, {}) for l in a.layers], float)
    reach = np.cumsum(macs[::-1])[::-1] / max(macs.sum(), 1.0)   # share of the MACs from layer i on
    order = {l.key: i for i, l in enumerate(a.layers)}
    runs = 0.0
    for u in units(a, tuning.method):
        amounts = len(tuning.fractions) + u.emptiable(a)
        runs += amounts * reach[min((order[k] for k in u.touched if k in order), default=0)]
    return tuning.steps * (runs / workers + STEP_RUNS) * run_seconds


@dataclass(frozen=True)
class SearchSize:
    """The steps and samples per measurement a search gets, and what it is estimated to take."""

    steps: int
    sens_samples: int
    estimated_seconds: float   # one search's measuring, at these settings
    asked_seconds: float       # ... and at the full settings, had the user left both open


def size_search(a: Analysis, cfg: CompressConfig, sample_seconds: float, samples: int, workers: int = 1) -> SearchSize:
    """Steps and samples per measurement for the settings the user left open (None): the most
    steps, then the most samples at those steps, whose estimated measuring time fits ``cfg.search_seconds``;
    the cheapest where none fits. ``sample_seconds``: one sample's run through the model;
    ``samples``: calibration samples there are to measure on. Deterministic given the timing."""
    tuning = SearchTuning.of(cfg)
    step_options = [cfg.steps] if cfg.steps is not None else list(range(STEPS, 0, -1))
    counts = [cfg.sens_samples] if cfg.sens_samples is not None else [SENS_SAMPLES, FEWEST_SAMPLES]
    # steps buy the most fidelity, samples the least (a YOLOv8n-seg-size network at 320×320,
    # --flops 0.3: held-out cosine 0.971 from 3 steps on 16 samples or on 8, 0.905 from 1 on 8)
    rungs = [(st, min(n, samples)) for st in step_options for n in counts]

    def estimate(st: int, n: int) -> float:
        return estimate_seconds(a, replace(tuning, steps=st), sample_seconds * n, workers)

    fits = [r for r in rungs if estimate(*r) <= cfg.search_seconds]
    st, n = fits[0] if fits else rungs[-1]
    return SearchSize(st, n, estimate(st, n), estimate(*rungs[0]))
