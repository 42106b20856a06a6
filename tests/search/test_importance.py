"""Channel selection accounts for the refit: a channel that others can stand in for goes first."""
import numpy as np
import onnx
from onnx import numpy_helper

from graphs import GRAPHS
from oracles import random_feeds

from onnxcc.search import Plan, WeightProbe
from onnxcc.search.emulation import plan_weights
from onnxcc.search.importance import channel_scores
from engine_helpers import normalized_analysis


def _duplicated_channel_model() -> onnx.ModelProto:
    """conv_chain with hidden channel 5 an exact copy of channel 1, and big weights reading it."""
    model = GRAPHS["conv_chain"](13)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in model.graph.initializer}
    w1, b1 = (numpy_helper.to_array(inits[n]).copy() for n in convs[0].input[1:3])
    w1[5], b1[5] = w1[1], b1[1]
    w2 = numpy_helper.to_array(inits[convs[1].input[1]]).copy()
    w2[:, 5] *= 10.0
    for name, arr in zip((convs[0].input[1], convs[0].input[2], convs[1].input[1]), (w1, b1, w2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))
    return model


def test_duplicate_channel_is_removed_first_and_refit_absorbs_it():
    model = _duplicated_channel_model()
    norm, a = normalized_analysis(model)
    x = np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)
    probe = WeightProbe(a, norm, {"x": x}, batched=False)   # the graph's batch is fixed at 1
    stats = probe.statistics({}, set(probe.views))
    scores = channel_scores(probe, Plan(), {}, stats, batch=1)
    (gid,) = [g for g, grp in a.groups.items() if grp.prunable and grp.size == 8]
    order = scores[gid]
    # one of the twins goes among the first (only channels that ReLU keeps dead may go before),
    # although the diagonal score ‖W[:, c]‖²·E[x²] would rank channel 5 (10x weights) near last
    twin = 1 if order[1] < order[5] else 5
    assert order[twin] <= 2
    plan = Plan()
    plan.keep[gid] = np.ones(8, bool)
    plan.keep[gid][twin] = False
    refit = probe.damage(plan_weights(probe, plan, stats))
    zeroed = probe.damage(plan_weights(probe, plan))
    assert refit < 1e-4 < zeroed


def test_scores_mark_removed_channels_and_order_the_rest():
    model = GRAPHS["tiny_resnet"](13)
    norm, a = normalized_analysis(model)
    probe = WeightProbe(a, norm, random_feeds(model, seed=2, batch=8), batched=True)
    stats = probe.statistics({}, set(probe.views))
    gid = next(g for g, grp in a.groups.items() if grp.prunable)
    plan = Plan()
    plan.keep[gid] = np.ones(a.groups[gid].size, bool)
    plan.keep[gid][0] = False
    s = channel_scores(probe, plan, plan_weights(probe, plan, stats), stats)
    assert np.isinf(s[gid][0])
    live = np.sort(s[gid][1:])
    np.testing.assert_array_equal(live, np.arange(len(live)))   # a strict removal order


def test_statistics_streamed_in_runs_equal_one_run_over_every_sample(monkeypatch):
    """Layer inputs stream through a run at a time (memory); the rows and sums are the whole set's."""
    from onnxcc.search import refit as reconstruct

    monkeypatch.setattr(reconstruct, "MAX_ROWS", 300)   # subsampled rows must be the same ones too
    model = GRAPHS["tiny_resnet"](13)
    norm, a = normalized_analysis(model)
    probe = WeightProbe(a, norm, random_feeds(model, seed=4, batch=20), batched=True)
    gid = next(g for g, grp in a.groups.items() if grp.prunable)
    plan = Plan()
    plan.keep[gid] = np.arange(a.groups[gid].size) % 2 == 0
    weights = plan_weights(probe, plan)
    full = set(probe.views)
    assert probe.stat_batch == 8
    streamed = probe.statistics(weights, full)
    probe.stat_batch = 3   # what wide layer inputs get (STAT_RUN_BYTES): runs of 3 samples, the last of 2
    narrow = probe.statistics(weights, full)
    probe.stat_batch = probe.batch = 20
    whole = probe.statistics(weights, full)
    for part in (streamed, narrow):
        assert part.rows == whole.rows and set(part.moments) == set(whole.moments) and whole.moments
        for k in whole.energy:
            np.testing.assert_allclose(part.energy[k], whole.energy[k], rtol=1e-5)
        for k, (S, C) in whole.moments.items():
            np.testing.assert_allclose(part.moments[k][0], S, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(part.moments[k][1], C, rtol=1e-4, atol=1e-6)
    monkeypatch.setattr("onnxcc.search.probe.STAT_RUN_BYTES", 1)   # wider layer inputs than a run may return
    assert WeightProbe(a, norm, random_feeds(model, seed=4, batch=20), batched=True).stat_batch == 1
