"""The global rate optimisation: λ's plan, landing near the target, the exact knapsack."""
import itertools

import numpy as np
from hypothesis import given, settings, strategies as st

from onnxcc.search.allocation import Options, interpolate, knapsack, land_near, outside, settle


def test_landing_trades_options_between_units_where_no_single_move_helps():
    """Units saving 3 and 4 per option; the budget asks for 13 and the choice (0, 4) saves 16.
    Stepping b back alone saves 12, over the budget; only trading a for b walks to (3, 1)."""
    opts = [Options("a", np.arange(6), np.linspace(0, 1, 6), 3.0 * np.arange(6)),
            Options("b", np.arange(6), np.linspace(0, 2, 6), 4.0 * np.arange(6))]

    def cost_of(ch):
        return 100.0 - opts[0].saving[ch[0]] - opts[1].saving[ch[1]]

    assert land_near(opts, [0, 4], cost_of, target=87.0, slack=0.5) == [3, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(2, 5))
def test_knapsack_finds_the_brute_force_optimum(seed, units, n):
    """Least charge with the summed saving in the band, over every combination of options."""
    rng = np.random.default_rng(seed)
    charge = [np.concatenate([[0.0], rng.random(n - 1)]) for _ in range(units)]
    saving = [np.concatenate([[0.0], np.sort(rng.integers(1, 20, n - 1)).astype(float)]) for _ in range(units)]
    lo = float(rng.integers(0, 30))
    hi = lo + float(rng.integers(0, 4))
    fits = [c for c in itertools.product(range(n), repeat=units)
            if lo - 1e-9 <= sum(s[i] for s, i in zip(saving, c)) <= hi + 1e-9]
    got = knapsack(charge, saving, lo, hi)
    if not fits:
        assert got is None
        return
    best = min(sum(ch[i] for ch, i in zip(charge, c)) for c in fits)
    assert got is not None and lo - 1e-6 <= sum(s[i] for s, i in zip(saving, got)) <= hi + 1e-6
    assert sum(ch[i] for ch, i in zip(charge, got)) <= best + 1e-6


def test_settle_lands_where_the_hull_and_single_steps_cannot():
    """Two units of 10 and 7 per option; the band asks for 24.5-25.5 removed jointly. Units
    share a layer, so the joint cost removes 1 more than the sum whenever both move: no sum of
    standalone savings falls in the band, a widened one finds 10 + 14, which lands."""
    saving = [10.0 * np.arange(4), 7.0 * np.arange(4)]
    damage = [np.array([0.0, 1.0, 5.0, 9.0]), np.array([0.0, 1.0, 2.0, 9.0])]

    def cost_of(ch):
        return 100.0 - saving[0][ch[0]] - saving[1][ch[1]] - (1.0 if ch[0] and ch[1] else 0.0)

    got = settle(saving, damage, cost_of, 100.0, 74.5, 75.5, [3, 0])   # 70: far past the target
    assert got == [1, 2] and cost_of(got) == 75.0
    assert settle(saving, damage, cost_of, 100.0, 68.0, 75.5, [3, 0]) == [3, 0]   # in the band: kept


def test_plans_over_the_budget_rank_after_those_that_meet_it():
    assert outside(80.0, 85.0, 90.0) < outside(91.0, 85.0, 90.0)   # 5 under before 1 over
    assert outside(87.0, 85.0, 90.0) == (False, 0.0) < outside(84.0, 85.0, 90.0)


def test_emptying_is_priced_apart_from_the_narrowing_curve():
    """An emptied group (the last amount) is charged its own damage; the narrower widths before
    it keep the charges they have without it, look-ahead included, whether emptying measured far
    worse or far better than the narrowest width."""
    grid = np.arange(9)
    saving = grid * 10.0
    narrow = interpolate("g", [2, 4, 7], [0.1, 0.2, 0.3], grid[:-1], saving[:-1], 0.9)
    for empty in (5.0, 0.05):
        o = interpolate("g", [2, 4, 7, 8], [0.1, 0.2, 0.3, empty], grid, saving, 0.9, last_apart=True)
        np.testing.assert_array_equal(o.damage[:-1], narrow.damage)
        assert abs(o.damage[-1] - empty) < 1e-6
    joined = interpolate("g", [2, 4, 7, 8], [0.1, 0.2, 0.3, 5.0], grid, saving, 0.9)
    assert joined.damage[7] > 10 * narrow.damage[7]   # what the look-ahead did when joined
