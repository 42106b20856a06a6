"""Self-tests of the test-support code: graph builders, hypothesis strategy, oracles."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

try:
    from .graphs import GRAPHS, OPSETS_TO_TRY, cases
    from .oracles import (assert_same_outputs, check_model_full, random_feeds, run,
                          runtime_macs, runtime_macs_by_node)
    from .strategies import cnn_models
except ImportError:
    from graphs import GRAPHS, OPSETS_TO_TRY, cases
    from oracles import (assert_same_outputs, check_model_full, random_feeds, run,
                         runtime_macs, runtime_macs_by_node)
    from strategies import cnn_models


def _check_and_run(model: onnx.ModelProto) -> list[np.ndarray]:
    check_model_full(model)
    outs = run(model, random_feeds(model))
    assert len(outs) == len(model.graph.output)
    for vi, o in zip(model.graph.output, outs):
        declared = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
        assert o.shape == declared, (vi.name, o.shape, declared)
        assert np.isfinite(o).all(), f"non-finite values in output {vi.name}"
    return outs


def test_registry_is_consistent():
    assert set(GRAPHS) == set(OPSETS_TO_TRY)
    for name, fn in GRAPHS.items():
        assert fn.__name__ == name
        assert 13 in OPSETS_TO_TRY[name] or name == "activations"
    assert {9, 21} <= set(OPSETS_TO_TRY["conv_bn"])
    assert "tiny_resnet" in GRAPHS and "tiny_mobilenet" in GRAPHS


@pytest.mark.parametrize("name,opset", cases(), ids=[f"{n}-op{o}" for n, o in cases()])
def test_builder_checks_and_runs(name, opset):
    model = GRAPHS[name](opset)
    assert model.opset_import[0].version == opset
    assert model.graph.input[0].name == "x"
    _check_and_run(model)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_builder_default_opset_and_determinism(name):
    a = GRAPHS[name]()
    assert a.opset_import[0].version == 13
    b = GRAPHS[name]()
    assert a.SerializeToString() == b.SerializeToString()
    assert_same_outputs(a, b, rtol=0, atol=0)


def test_seed_changes_weights():
    a, b = GRAPHS["conv_bn"](seed=0), GRAPHS["conv_bn"](seed=1)
    with pytest.raises(AssertionError, match="max_abs_diff"):
        assert_same_outputs(a, b)


def test_tiny_models_size():
    for name in ("tiny_resnet", "tiny_mobilenet"):
        n_conv = sum(n.op_type == "Conv" for n in GRAPHS[name]().graph.node)
        assert 9 <= n_conv <= 14, (name, n_conv)


def test_runtime_macs_conv_chain():
    # x(1,3,12,12); Conv 3->8 k3 p1 -> 8*3*3*3 * 12*12; Conv 8->6 k3 p1 -> 6*8*3*3 * 12*12
    expected = 8 * 3 * 3 * 3 * 12 * 12 + 6 * 8 * 3 * 3 * 12 * 12
    assert expected == 93312
    assert runtime_macs(GRAPHS["conv_chain"]()) == expected


def test_runtime_macs_flatten_gemm():
    # x(1,3,8,8); Conv 3->4 k3 p1 -> 4*3*9 * 64; Flatten -> 256; Gemm 256->10
    expected = 4 * 3 * 9 * 8 * 8 + 10 * 256
    assert expected == 9472
    m = GRAPHS["flatten_gemm"]()
    assert runtime_macs(m) == expected
    # opset 9 (Gemm with mandatory C) gives the same count
    assert runtime_macs(GRAPHS["flatten_gemm"](9)) == expected


def test_runtime_macs_other_ops():
    # ConvTranspose: prod(W) * prod(X.spatial); W=(8,6,3,3), X=(1,8,8,8)
    per = {op: m for _, op, m in runtime_macs_by_node(GRAPHS["conv_transpose"]())}
    assert per["ConvTranspose"] == 8 * 6 * 9 * 8 * 8
    # MatMul: (1,64)x(64,10) after the NHWC convs (4 ch, 4x4)
    per = {op: m for _, op, m in runtime_macs_by_node(GRAPHS["transpose_nhwc"]())}
    assert per["MatMul"] == 10 * 64
    # Gemm transB=0 : (1,8)x(8,5)
    per = [m for _, op, m in runtime_macs_by_node(GRAPHS["gap_gemm"]()) if op == "Gemm"]
    assert per == [8 * 12, 5 * 8]
    # weights as Constant nodes are handled too
    assert runtime_macs(GRAPHS["conv_constant_weights"]()) == 8 * 27 * 64 + 6 * 72 * 64
    # grouped / depthwise weights are already (Cout, Cin/g, k, k)
    per = [m for _, op, m in runtime_macs_by_node(GRAPHS["depthwise_multiplier"]())]
    assert per == [6 * 4 * 144, 12 * 1 * 9 * 36, 5 * 12 * 36]


def test_assert_same_outputs_messages():
    a = GRAPHS["multi_output"]()
    diffs = assert_same_outputs(a, a)
    assert set(diffs) == {o.name for o in a.graph.output}
    with pytest.raises(AssertionError, match="outputs differ by name"):
        assert_same_outputs(a, GRAPHS["conv_chain"](), feeds=random_feeds(a))


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cnn_models())
def test_cnn_models_check_and_run(model):
    _check_and_run(model)
