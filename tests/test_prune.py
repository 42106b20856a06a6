import numpy as np
import pytest

from engine_helpers import normalized_analysis, random_keep, zero_reads
from graphs import GRAPHS, cases
from oracles import assert_same_outputs, check_model_full, random_feeds, runtime_macs

from onnxcc.analysis.op_rules import CHANNEL_RULES, PARAM_OPS
from onnxcc.errors import PassContractError
from onnxcc.passes.prune import PRUNE_HANDLERS, PruneChannelsPass


def test_every_param_op_has_a_handler():
    assert PARAM_OPS <= set(PRUNE_HANDLERS)
    assert PARAM_OPS <= set(CHANNEL_RULES)


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
    assert not any(n.op_type == "Gather" for n in res.model.graph.node)
    assert len(res.model.graph.node) == len(norm.graph.node)
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


def test_group_never_loses_all_channels():
    norm, a = normalized_analysis(GRAPHS["conv_chain"](13))
    gid, g = next((k, g) for k, g in a.groups.items() if g.prunable)
    with pytest.raises(PassContractError, match="all its channels"):
        PruneChannelsPass(a, {gid: np.zeros(g.size, bool)})
