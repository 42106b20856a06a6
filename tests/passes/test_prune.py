from collections import Counter

import numpy as np
import pytest

from engine_helpers import normalized_analysis, random_keep, zero_reads
from graphs import GRAPHS, GraphBuilder, cases
from oracles import assert_same_outputs, check_model_full, random_feeds, runtime_macs

from onnxcc.errors import PassContractError
from onnxcc.passes.prune import PruneChannelsPass


@pytest.mark.parametrize("name,opset", cases())
def test_pruning_zeroed_channels_is_exact(name, opset):
    norm, a = normalized_analysis(GRAPHS[name](opset))
    feeds = random_feeds(norm)
    keep = random_keep(a, seed=opset)
    before = norm.SerializeToString()
    res = PruneChannelsPass(a, keep)(norm)
    assert norm.SerializeToString() == before
    check_model_full(res.model)
    assert_same_outputs(zero_reads(a, norm, keep), res.model, feeds, rtol=1e-5, atol=1e-5)
    # kept channels are sliced out of the weights, never gathered at run time
    assert Counter(n.op_type for n in res.model.graph.node) == Counter(n.op_type for n in norm.graph.node)
    assert runtime_macs(res.model, feeds) == res.record.macs_after
    assert res.record.channels_removed == sum(int((~m).sum()) for m in keep.values())


@pytest.mark.parametrize("name", ["conv_chain", "tiny_resnet", "split", "concat"])
def test_keep_everything_is_identity(name):
    norm, a = normalized_analysis(GRAPHS[name](13))
    keep = {gid: np.ones(g.size, bool) for gid, g in a.groups.items() if g.prunable}
    res = PruneChannelsPass(a, keep)(norm)
    assert not res.record.modified
    assert_same_outputs(norm, res.model, rtol=0, atol=0)


@pytest.mark.parametrize("name,reason", [
    ("unknown_op", "not understood"), ("unknown_op_s2d", "not understood"),
    ("grouped_conv", "grouped convolution"), ("depthwise_multiplier", "channel multiplier"),
])
def test_unsupported_structure_freezes_with_reason(name, reason):
    _, a = normalized_analysis(GRAPHS[name](13))
    frozen = [r for g in a.groups.values() for r in g.frozen]
    assert any(reason in r for r in frozen), frozen


def test_graph_outputs_are_frozen():
    _, a = normalized_analysis(GRAPHS["multi_output"](13))
    out_groups = [g for g in a.groups.values() if any("graph output" in r for r in g.frozen)]
    assert len(out_groups) >= 2


def test_residual_join_is_one_group():
    _, a = normalized_analysis(GRAPHS["residual_add"](13))
    joined = [g for g in a.groups.values() if len(g.origins) >= 2]
    assert joined, "the residual Add should unite the producers of both operands"


def test_frozen_group_cannot_be_pruned():
    norm, a = normalized_analysis(GRAPHS["unknown_op"](13))
    gid, g = next((k, g) for k, g in a.groups.items() if g.frozen)
    m = np.ones(g.size, bool)
    m[0] = False
    with pytest.raises(PassContractError, match="frozen"):
        PruneChannelsPass(a, {gid: m})


def test_group_never_loses_all_channels_where_nothing_folds():
    norm, a = normalized_analysis(GRAPHS["conv_chain"](13))
    gid, g = next((k, g) for k, g in a.groups.items() if g.prunable)
    assert not g.droppable
    with pytest.raises(PassContractError, match="all its channels"):
        PruneChannelsPass(a, {gid: np.zeros(g.size, bool)})


@pytest.mark.parametrize("name,opset", cases())
def test_emptying_droppable_groups_is_exact(name, opset):
    """Every group the liveness analysis lets a plan empty (all at once, the rest pruned at
    random): the folded graph computes what the full graph with those reads zeroed computes,
    passes the full check, and has the MACs the cost model predicted. A group it refuses must
    be refused by the pass too."""
    norm, a = normalized_analysis(GRAPHS[name](opset))
    feeds = random_feeds(norm)
    keep = random_keep(a, seed=opset)
    emptied = [gid for gid, g in a.groups.items() if g.droppable]
    for gid in emptied:
        keep[gid] = np.zeros(a.groups[gid].size, bool)
    refused = next((gid for gid, g in a.groups.items() if g.prunable and not g.droppable), None)
    if refused is not None:
        with pytest.raises(PassContractError, match="all its channels"):
            PruneChannelsPass(a, {**keep, refused: np.zeros(a.groups[refused].size, bool)})
    res = PruneChannelsPass(a, keep)(norm)
    check_model_full(res.model)
    assert_same_outputs(zero_reads(a, norm, keep), res.model, feeds, rtol=1e-5, atol=1e-5)
    assert runtime_macs(res.model, feeds) == res.record.macs_after
    if emptied:
        assert len(res.model.graph.node) < len(norm.graph.node)


def test_residual_branches_and_squeeze_excite_may_be_emptied():
    expected = {"tiny_resnet": 4, "tiny_mobilenet": 3, "residual_add": 2, "se_block": 1, "depthwise": 1,
                "conv_chain": 0, "concat": 0, "split": 0, "multi_output": 0}
    found = {}
    for name in expected:
        _, a = normalized_analysis(GRAPHS[name](13))
        found[name] = sum(g.droppable for g in a.groups.values())
    assert found == expected


def _branch(tail: str):
    """x -> 1x1 -> ReLU -> 3x3 (reads the group) -> ReLU -> tail -> + x: the branch folds to one
    value per channel only if the tail treats every position alike."""
    g = GraphBuilder(13, 0, "branch")
    x = g.input((1, 4, 8, 8))
    y = g.relu(g.conv(x, 6, 1))
    y = g.relu(g.conv(y, 5, 3))
    if tail == "scale along W":   # a [W] vector broadcasts along the last axis
        y = g.mul(y, g.f32(np.linspace(0.5, 2.0, 8, dtype=np.float32)))
    y = g.conv(y, 4, 3 if tail == "3x3" else 1)
    return g.build(g.conv(g.add(x, y), 3, 1))


@pytest.mark.parametrize("tail,droppable", [("1x1", True), ("3x3", False), ("scale along W", False)])
def test_a_branch_empties_only_through_position_blind_ops(tail, droppable):
    norm, a = normalized_analysis(_branch(tail))
    inner = [g for g in a.groups.values() if g.prunable and g.size == 6]
    assert len(inner) == 1 and inner[0].droppable is droppable
    if droppable:
        kept = {inner[0].id: 0}
        assert len(a.dead(kept)) == 3   # the 1x1 that fed the group, the reducer, the tail
        res = PruneChannelsPass(a, {inner[0].id: np.zeros(6, bool)})(norm)
        ops = [n.op_type for n in res.model.graph.node]
        # x + c is written as a 1x1 depthwise Conv (one MAC per element), then the head
        assert ops == ["Conv", "Conv"] and runtime_macs(res.model) == a.macs(kept)
