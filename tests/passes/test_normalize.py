import numpy as np
import onnx
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


@pytest.mark.parametrize("const_shape,folds", [((1, 8, 1, 1), True), ((8, 1, 1), True), ((), True), ((1,), True),
                                               ((1, 8, 12, 12), False), ((12,), False)])
def test_per_channel_scale_and_shift_after_a_conv_fold_into_it(const_shape, folds):
    """Conv → Mul(s) → Add(b) → Sub(c) → Div(d) (a Keras scale-and-shift, BN written out) folds
    into the Conv where the constants vary along channels only; outputs stay the same."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {k: (rng.uniform(0.5, 2, const_shape) if const_shape else np.float64(rng.uniform(0.5, 2))).astype(np.float32)
              for k in "sbcd"}
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["s", "y"], ["y1"]), helper.make_node("Add", ["y1", "b"], ["y2"]),
             helper.make_node("Sub", ["y2", "c"], ["y3"]), helper.make_node("Div", ["y3", "d"], ["y4"]),
             helper.make_node("Relu", ["y4"], ["out"])]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "bias")]
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    model = helper.make_model(helper.make_graph(
        nodes, "affine", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8, 12, 12])], inits),
        opset_imports=[helper.make_opsetid("", 13)])
    res = FoldBatchNormPass()(model)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops == (["Conv", "Relu"] if folds else ["Conv", "Mul", "Add", "Sub", "Div", "Relu"])
    assert_same_outputs(model, res.model, rtol=1e-5, atol=1e-5)
