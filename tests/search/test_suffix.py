"""Damages measured from cached activations (only the nodes a change reaches) equal whole runs."""
import numpy as np
import onnx
import pytest

from engine_helpers import normalized_analysis
from graphs import GRAPHS, OPSETS_TO_TRY
from oracles import random_feeds

from onnxcc.search import Plan, WeightProbe
from onnxcc.search.emulation import plan_weights
from onnxcc.search.plan import affected_layers


def _changes(probe: WeightProbe, seed: int = 0):
    """Half of every prunable group's channels, and a rank cut of every factorizable conv."""
    a, rng = probe.analysis, np.random.default_rng(seed)
    plans = []
    for gid, g in a.groups.items():
        if g.prunable and g.size > 1:
            p = Plan()
            p.keep[gid] = rng.permutation(g.size) < (g.size + 1) // 2
            plans.append((affected_layers(a, gid), p))
    for layer in a.layers:
        if layer.factorizable and layer.key in probe.views:
            p = Plan()
            p.ranks[layer.key] = max(1, layer.max_useful_rank() // 2)
            plans.append(({layer.key}, p))
    return [(touched, lambda p=p, t=touched: plan_weights(probe, p, None, t)) for touched, p in plans]


def _check(probe: WeightProbe) -> int:
    base = plan_weights(probe, Plan())
    changes = _changes(probe)
    whole = [probe.damage({**base, **build()}) for _, build in changes]
    for _ in range(2):   # the second time from the sessions the first one built
        np.testing.assert_allclose(probe.damages(base, changes), whole, rtol=1e-5, atol=1e-9)
    return len(changes)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_damages_from_cuts_equal_whole_runs(name):
    model = GRAPHS[name](OPSETS_TO_TRY[name][-1])
    norm, a = normalized_analysis(model)
    probe = WeightProbe(a, norm, random_feeds(model, seed=1), batched=False)
    _check(probe)


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    return m


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet", "concat", "split"])
def test_damages_from_cuts_with_a_partial_last_batch(name):
    """11 samples run as batches of 8 and 3: cut tensors are cached per batch."""
    model = _dynamic_batch(GRAPHS[name](13))
    norm, a = normalized_analysis(model)
    feeds = {k: np.concatenate([random_feeds(model, seed=s)[k] for s in range(11)])
             for k in random_feeds(model)}
    probe = WeightProbe(a, norm, feeds, batched=True)
    assert _check(probe) > 0
    assert probe.runner.suffixes.enabled


@pytest.mark.parametrize("name", ["tiny_resnet", "reshape_gemm"])
def test_damages_from_cuts_on_ir3_graphs(name):
    """IR < 4: every initializer is also a graph input (a shape constant among them)."""
    model = GRAPHS[name](OPSETS_TO_TRY[name][0])
    model.ir_version = 3
    model.graph.input.extend(onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in model.graph.initializer)
    norm, a = normalized_analysis(model)
    probe = WeightProbe(a, norm, random_feeds(model, seed=1), batched=False)
    assert _check(probe) > 0
