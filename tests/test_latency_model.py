"""The latency model prices plans from measured Conv timings; compress uses it to refuse slow
factorizations and to meet --latency budgets."""
import subprocess
import sys

import pytest

from graphs import GRAPHS, GraphBuilder

from onnxcc import latency
from onnxcc.compression import LATENCY_TOLERANCE, compress
from onnxcc.search import SearchTuning
from onnxcc.errors import TargetUnreachableError
from onnxcc.latency_model import LatencyModel, axis_grid, _site
from engine_helpers import normalized_analysis

TARGET_TOLERANCE = SearchTuning().target_tolerance


def _speed(cin: int, cout: int) -> float:
    """A separable per-MAC cost: narrow layers run slower per MAC."""
    return (1 + 8 / cin) * (1 + 4 / cout)


SECONDS_PER_MAC = 1e-9   # slow enough that the fake Convs, not real per-op overhead, dominate


def _fake(launch: float = 0.0):
    """Each Conv costs MACs × _speed × SECONDS_PER_MAC plus a fixed ``launch`` cost: with a launch cost
    above any dense Conv of the test nets, an SVD pair (two Convs) never pays."""
    def measure(chains, *a, **k):
        return [sum(latency.chain_macs((hw, (c,))) * SECONDS_PER_MAC * _speed(c.cin, c.cout) + launch for c in convs)
                for hw, convs in chains]
    return measure


@pytest.fixture
def fake_table(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "measure_chains", _fake())
    return latency.LatencyTable("cpu", 1, tmp_path / "t.json")


def test_axis_grid():
    assert axis_grid(16, 100) == [16, 32, 64, 100]
    assert axis_grid(3, 3) == [3]
    assert axis_grid(16, 16) == [16]
    assert axis_grid(1, 8) == [1, 2, 4, 8]


def test_model_reproduces_a_separable_table(fake_table):
    _, a = normalized_analysis(GRAPHS["tiny_resnet"](13))
    lm = LatencyModel(a, fake_table, round_to=4)
    dense = [l for l in a.layers if _site(l) is not None and not _site(l).depthwise]
    assert dense
    for l in dense:
        expect = l.macs * SECONDS_PER_MAC * _speed(l.cin, l.cout)
        assert lm.layer_seconds(l, {}) == pytest.approx(expect, rel=1e-9)
    # pruned widths on the grid are exact too; halving a group never makes a layer slower
    gid = next(g for g, grp in a.groups.items() if grp.prunable)
    half = {gid: a.groups[gid].size // 2}
    for l in dense:
        assert lm.layer_seconds(l, half) <= lm.layer_seconds(l, {}) + 1e-18
    assert lm.seconds(half) < lm.seconds()


def test_an_emptied_branch_costs_its_join_not_its_convs(fake_table):
    """Emptying a residual branch takes its Convs' seconds off and puts the join's 1×1 depthwise
    Conv (``x + c``, one MAC per element) on, priced from its own measured site."""
    _, a = normalized_analysis(GRAPHS["tiny_resnet"](13))
    lm = LatencyModel(a, fake_table, round_to=4)
    g = next(g for g in a.groups.values() if g.droppable)
    kept = {g.id: 0}
    (join,) = a.unit_convs(kept)
    c, h, w = a.view.shape(join)[1:]
    live = sum(lm.layer_seconds(l, {}) for l in a.layers if l.key not in a.dead(kept))
    assert {l.key for l in a.layers} > a.dead(kept) and len(a.dead(kept)) == 2
    assert lm.layers_seconds(kept) == pytest.approx(live + c * h * w * SECONDS_PER_MAC * _speed(c, c), rel=1e-9)


def test_calibrate_splits_overhead_and_scale(fake_table):
    _, a = normalized_analysis(GRAPHS["tiny_resnet"](13))
    lm = LatencyModel(a, fake_table, round_to=4)
    convs = lm.seconds()
    lm.calibrate(convs * 1.5)
    assert lm.overhead == pytest.approx(convs * 0.5) and lm.scale == 1.0
    assert lm.seconds() == pytest.approx(convs * 1.5)
    lm.calibrate(convs * 0.5)
    assert lm.overhead == 0.0 and lm.seconds() == pytest.approx(convs * 0.5)


@pytest.mark.slow
def test_slow_factorizations_are_never_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "measure_chains", _fake(launch=1.0))
    res = compress(GRAPHS["tiny_resnet"](13), 0.4, steps=2, round_to=1)
    assert res.plan.ranks == {}
    assert abs(res.report["totals"]["mac_reduction"] - 0.4) <= 0.02


@pytest.mark.slow
def test_latency_budget_prices_factorizations(monkeypatch, tmp_path):
    """decompose under --latency: takes SVD pairs the table says are fast, refuses the target
    when the table says every pair is slower than its dense conv."""
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path / "fast"))
    monkeypatch.setattr(latency, "measure_chains", _fake())
    res = compress(GRAPHS["tiny_resnet"](13), latency=0.3, method="decompose", steps=1, round_to=1)
    # the first search prices by the (fake) table; later ones aim by the real model's timing
    assert res.plan.ranks and res.report["search"]["latency_rounds"][0]["predicted"] >= 0.3 - TARGET_TOLERANCE
    monkeypatch.setenv("ONNXCC_CACHE", str(tmp_path / "slow"))
    monkeypatch.setattr(latency, "measure_chains", _fake(launch=1.0))
    with pytest.raises(TargetUnreachableError, match="latency"):
        compress(GRAPHS["tiny_resnet"](13), latency=0.3, method="decompose", steps=1, round_to=1)


def _wide_chain():
    """Convs wide enough that their time, not per-op overhead, dominates a run (~1 ms)."""
    g = GraphBuilder(13, 0, "wide_chain")
    y = g.input((1, 16, 32, 32))
    for _ in range(3):
        y = g.relu(g.conv(y, 64, 3, bias=True))
    return g.build(g.conv(y, 16, 1, bias=True))


@pytest.mark.slow
def test_latency_budget_is_met_by_the_model():
    model = _wide_chain()
    res = compress(model, latency=0.3, steps=2)
    lat, search = res.report["totals"]["latency"], res.report["search"]
    rounds = search["latency_rounds"]
    # A search never stops more than a point short of its predicted target (land_near may stop
    # just short: 0.2999 is on target). It may go beyond: where the plans inside the band measure
    # out of all proportion more damage than one removing more, landing keeps the latter, and
    # which plans those are depends on the live timings behind the latency table.
    assert all(r["predicted"] >= r["asked"] - 0.01 for r in rounds)
    # another search only where the measured plan missed by more than the tolerance; the plan
    # measured nearest the target is the one written, priced as its search priced it
    assert len(rounds) == 1 or abs(rounds[0]["measured"] - 0.3) > LATENCY_TOLERANCE
    kept = rounds[search["latency_kept"] - 1]
    assert abs(kept["measured"] - 0.3) == min(abs(r["measured"] - 0.3) for r in rounds)
    assert lat["predicted_reduction"] == pytest.approx(kept["predicted"], abs=1e-3)
    assert lat["ms_before"] > 0 and lat["ms_after"] > 0 and lat["speedup"] > 0
    assert res.report["config"]["latency"] == 0.3 and res.report["config"]["flops"] is None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxcc", *args], capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("target", [["--flops", "0.3", "--latency", "0.3"], [], ["--latency", "1.5"]])
def test_cli_needs_exactly_one_valid_target(tmp_path, target):
    src = tmp_path / "m.onnx"
    import onnx
    onnx.save(GRAPHS["tiny_resnet"](13), src)
    out = tmp_path / "o.onnx"
    p = _cli("compress", str(src), *target, "-o", str(out))
    assert p.returncode == 2 and not out.exists()
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) <= 3
