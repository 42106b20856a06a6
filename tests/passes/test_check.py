"""CheckPass (the rewrite's last pass) and the structure every pass ensures (onnxruntime itself
refuses a graph with two nodes of one name)."""
from __future__ import annotations

import onnx
import pytest

from graphs import GRAPHS
from oracles import random_feeds, runtime_macs
from onnxcc.errors import PassContractError, VerificationError
from onnxcc.passes.base import Pass, PassResult, check_structure
from onnxcc.passes.check import CheckPass
from onnxcc.passes.normalize import NameNodesPass, normalize

SHAPES = {"x": (1, 3, 16, 16)}


def _model() -> onnx.ModelProto:
    return normalize(GRAPHS["tiny_resnet"](13)).model


def test_check_records_runtime_macs_and_refuses_a_plan_it_does_not_compute():
    model = _model()
    feeds = random_feeds(model)
    macs = runtime_macs(model, feeds)
    res = CheckPass(SHAPES, feeds, macs=macs)(model)
    assert res.model is model and res.record.macs == macs and res.record.planned_macs == macs
    with pytest.raises(PassContractError, match="plan priced"):
        CheckPass(SHAPES, feeds, macs=macs - 1)(model)


def test_check_refuses_models_users_could_not_load():
    model = _model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(VerificationError, match="onnx.checker"):
        CheckPass(SHAPES, random_feeds(model))(broken)


def test_every_pass_ensures_topological_order_and_single_producers():
    model = _model()
    unsorted = onnx.ModelProto()
    unsorted.CopyFrom(model)
    nodes = list(unsorted.graph.node)
    del unsorted.graph.node[:]
    unsorted.graph.node.extend(nodes[::-1])

    class Reverse(Pass):
        def call(self, m: onnx.ModelProto) -> PassResult:
            return PassResult(unsorted, None)

    with pytest.raises(PassContractError, match="before it is produced"):
        Reverse()(model)
    twice = onnx.ModelProto()
    twice.CopyFrom(model)
    twice.graph.node[1].output[0] = twice.graph.node[0].output[0]
    with pytest.raises(PassContractError, match="produced twice"):
        check_structure(twice)


def test_nodes_get_unique_names_and_the_check_requires_them():
    model = _model()
    for n in model.graph.node[:3]:
        n.name = ""
    model.graph.node[4].name = model.graph.node[5].name
    with pytest.raises(PassContractError, match="not unique"):
        check_structure(model, unique_node_names=True)
    named = NameNodesPass()(model)
    names = [n.name for n in named.model.graph.node]
    assert all(names) and len(set(names)) == len(names) and named.record.count == 4
    assert names[5] == model.graph.node[5].name or names[4] == model.graph.node[4].name
    CheckPass(SHAPES, random_feeds(model))(named.model)
