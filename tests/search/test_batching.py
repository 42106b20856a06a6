"""Measuring in batches only where batches give what single samples give, and models whose
layers onnxcc cannot time (1-D Convs) compress without the latency model."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from oracles import check_model_full, run

from onnxcc.compression import compress
from onnxcc.search import RUN_BATCH, SearchTuning, WeightProbe
from engine_helpers import normalized_analysis

TARGET_TOLERANCE = SearchTuning().target_tolerance


def _init(name: str, shape, rng) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _two_convs(name: str, tail: list[onnx.NodeProto], tail_inits: list[onnx.TensorProto], out: str,
               out_shape: list) -> onnx.ModelProto:
    """x(N, 4, 6, 6) -> Conv -> Relu -> Conv -> c2, then ``tail`` from c2 to ``out``."""
    rng = np.random.default_rng(0)
    inits = [_init("w1", (8, 4, 3, 3), rng), _init("w2", (8, 8, 3, 3), rng)] + tail_inits
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4)] + tail
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _fixed_batch_inside(reshape_to: list[int]) -> onnx.ModelProto:
    """Two Convs -> Reshape(reshape_to) [-> Gemm]: the declared batch is dynamic, the Reshape's
    constant shape is not."""
    tail = [helper.make_node("Reshape", ["c2", "shape"], ["flat"])]
    inits = [numpy_helper.from_array(np.array(reshape_to, np.int64), "shape")]
    if reshape_to[-1] == -1:
        return _two_convs("fixed_batch_inside", tail, inits, "flat", [1, 288])
    tail.append(helper.make_node("Gemm", ["flat", "wg"], ["y"], transB=1))
    inits.append(_init("wg", (10, 288), np.random.default_rng(1)))
    return _two_convs("fixed_batch_inside", tail, inits, "y", [1, 10])


def _probe_of_single_runs(model: onnx.ModelProto, samples: int) -> WeightProbe:
    """A probe asked to batch ``samples`` samples that had to run them one at a time, and did
    so faithfully: its outputs are the model's single-sample outputs."""
    norm, a = normalized_analysis(model)
    x = np.random.default_rng(1).standard_normal((samples, 4, 6, 6)).astype(np.float32)
    probe = WeightProbe(a, norm, {"x": x}, batched=True)
    assert probe.batch == 1
    singles = np.concatenate([run(model, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(probe.outputs({})[0], singles, rtol=1e-5, atol=1e-5)
    return probe


@pytest.mark.parametrize("reshape_to", [[1, 288], [1, -1]], ids=["batches-fail", "batches-mix-samples"])
def test_a_batch_fixed_inside_the_graph_runs_one_sample_at_a_time(reshape_to):
    model = _fixed_batch_inside(reshape_to)
    _probe_of_single_runs(model, 2 * RUN_BATCH)

    # one channel here is 12.5%: only a floor of a quarter leaves widths that land on 0.3
    res = compress(model, 0.3, calib=None, steps=1, round_to=1, min_keep=0.25)
    check_model_full(res.model)
    assert res.report["totals"]["mac_reduction"] >= 0.3 - TARGET_TOLERANCE


def test_batches_are_kept_where_they_reproduce_single_runs():
    model = _fixed_batch_inside([-1, 288])
    norm, a = normalized_analysis(model)
    x = np.random.default_rng(1).standard_normal((2 * RUN_BATCH, 4, 6, 6)).astype(np.float32)
    assert WeightProbe(a, norm, {"x": x}, batched=True).batch == RUN_BATCH


def _conv1d_net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [_init("w1", (16, 1, 8), rng), _init("w2", (16, 16, 3), rng), _init("w3", (8, 16, 3), rng)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[4]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1]), helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], pads=[1, 1])]
    g = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 63])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_a_network_of_1d_convs_compresses_without_the_latency_model():
    res = compress(_conv1d_net(), 0.3, steps=1, round_to=1)   # latency-aware by default
    check_model_full(res.model)
    assert abs(res.report["totals"]["mac_reduction"] - 0.3) <= 0.015
    assert "predicted_ms_before" not in res.report["totals"]["latency"]


def test_an_output_with_the_batch_on_a_later_axis_is_measured_sample_by_sample():
    """A CRNN's (T, N, C) output: concatenating batches of 8 and a last batch of 3 along the
    first axis cannot work, and single samples define the comparison."""
    model = _two_convs("seq_first", [helper.make_node("Transpose", ["c2"], ["y"], perm=[3, 0, 1, 2])], [],
                       "y", [6, "N", 8, 6])
    _probe_of_single_runs(model, RUN_BATCH + 3)
