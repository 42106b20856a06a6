"""The search for a compression plan, in the order it runs.

- :mod:`.plan`: the :class:`Plan` and the units it is decided over (group and rank units);
- :mod:`.context`: one search's :class:`SearchContext` and :class:`SearchTuning`;
- :mod:`.probe`: the onnxruntime probe that measures damage and layer statistics, with
  :mod:`.jobs` (measurements as picklable jobs, here or on Ray), :mod:`.suffix` (re-running only
  what a change reaches) and :mod:`.statistics`;
- :mod:`.emulation`: a plan's weights inside the unmodified graph (:mod:`.refit`: least squares);
- :mod:`.importance`: the order in which channels go;
- :mod:`.step`, :mod:`.landing`, :mod:`.allocation`: one step's measurements, allocation and plan;
- :mod:`.driver`: the multi-step search; :mod:`.sizing`: its estimated time, steps and tries.
"""
from .context import SearchContext, SearchTuning
from .driver import StepStore, search_plan
from .plan import Plan, check_reachable
from .probe import RUN_BATCH, WeightProbe
from .sizing import SearchSize, size_search, tries_for

__all__ = ["Plan", "SearchContext", "SearchSize", "SearchTuning", "StepStore", "WeightProbe", "RUN_BATCH",
           "check_reachable", "search_plan", "size_search", "tries_for"]
