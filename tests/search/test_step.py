"""A step's measurements: every unit where it decides, the flat ones nowhere else."""
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from onnxcc.search import SearchTuning
from onnxcc.search.landing import Offer
from onnxcc.search.plan import Plan, Unit
from onnxcc.search.step import _measure


@dataclass
class _Line(Unit):
    """A unit whose damage grows on a line, ``slope`` at its widest (amount 10)."""

    label: str = ""
    slope: float = 0.0

    @property
    def name(self) -> str:
        return self.label

    def grid(self, ctx, plan, scores, multiple):
        raise NotImplementedError

    def amount(self, a, before, after):
        raise NotImplementedError

    def slot(self, plan):
        raise NotImplementedError


class _Probe:
    """Damage of a candidate read off its unit's line (the candidate's weights are never built)."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []

    def damages(self, base, changes, done):
        jobs = [(build.args[0], build.args[2]) for _, build in changes]
        self.calls.append([(u.name, k) for u, k in jobs])
        for _ in jobs:
            done()
        return [0.5 + u.slope * k / 10 for u, k in jobs]


def test_a_flat_unit_is_measured_at_its_widest_alone():
    units = [_Line({"a"}, label="steep", slope=1.0), _Line({"b"}, label="middling", slope=0.4),
             _Line({"c"}, label="flat", slope=0.01)]
    offers = [Offer(u, np.arange(11), lambda plan, k: None) for u in units]
    probe, ticks = _Probe(), []
    ctx = SimpleNamespace(probe=probe, analysis=None, tuning=SearchTuning(),
                          progress=lambda text, done, total: ticks.append((done, total)))
    _measure(ctx, Plan(), None, {}, 0.5, offers, step=1)

    assert probe.calls[0] == [("steep", 10), ("middling", 10), ("flat", 10)]   # the widest first
    assert {name for name, _ in probe.calls[1]} == {"steep", "middling"}
    every = [2, 4, 7, 10]   # nearest 0.2, 0.45, 0.7 and 1 of the widest
    assert [u.measured for u in units] == [every, every, [10]]
    for u in units:
        np.testing.assert_allclose(u.damage, [u.slope * k / 10 for k in u.measured])
    assert ticks[-1] == (9, 9)   # the progress counts the jobs run


def test_no_unit_is_flat_at_a_share_of_zero():
    units = [_Line({"a"}, label="steep", slope=1.0), _Line({"c"}, label="flat", slope=1e-6)]
    offers = [Offer(u, np.arange(11), lambda plan, k: None) for u in units]
    ctx = SimpleNamespace(probe=_Probe(), analysis=None, tuning=SearchTuning(flat_share=0.0), progress=None)
    _measure(ctx, Plan(), None, {}, 0.5, offers, step=1)
    assert [u.measured for u in units] == [[2, 4, 7, 10]] * 2
