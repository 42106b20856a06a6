import pytest

from graphs import GRAPHS, cases
from oracles import assert_same_outputs, check_model_full

from onnxcc.passes.normalize import (FoldBatchNormPass, FusePadIntoConvPass, LiftConstantsPass,
                                     RemoveIdentityPass, normalize)


@pytest.mark.parametrize("name,opset", cases())
def test_normalize_keeps_outputs(name, opset):
    model = GRAPHS[name](opset)
    before = model.SerializeToString()
    res = normalize(model)
    assert model.SerializeToString() == before, "input model was modified"
    check_model_full(res.model)
    assert_same_outputs(model, res.model, rtol=1e-5, atol=1e-5)
    assert [o.name for o in res.model.graph.output] == [o.name for o in model.graph.output]
    assert [o.name for o in res.model.graph.input] == [o.name for o in model.graph.input]
    assert [(o.domain, o.version) for o in res.model.opset_import] == \
        [(o.domain, o.version) for o in model.opset_import]


def test_fold_batchnorm_removes_bn_after_conv():
    model = GRAPHS["conv_bn"](13)
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    res = FoldBatchNormPass()(model)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert res.record.count == n_bn and res.record.modified
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    assert_same_outputs(model, res.model, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_standalone_bn():
    model = GRAPHS["bn_standalone"](13)
    res = FoldBatchNormPass()(model)
    assert any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    assert any("preceded by" in s for s in res.record.skipped)


def test_lift_constants_makes_initializers():
    model = GRAPHS["conv_constant_weights"](13)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    res = LiftConstantsPass()(model)
    assert not any(n.op_type == "Constant" for n in res.model.graph.node)
    assert res.record.count > 0
    assert_same_outputs(model, res.model)


def test_pad_fused_into_conv():
    model = GRAPHS["pad"](13)
    res = FusePadIntoConvPass()(model)
    assert res.record.count >= 1
    assert not any(n.op_type == "Pad" for n in res.model.graph.node)
    assert_same_outputs(model, res.model)


def test_remove_identity_is_honest_when_nothing_to_do():
    res = RemoveIdentityPass()(GRAPHS["conv_chain"](13))
    assert res.record.count == 0 and not res.record.modified
