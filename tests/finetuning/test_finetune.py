"""onnxcc.finetuning: the torch executor matches onnxruntime, weights round-trip exactly, and
distillation fine-tuning lowers the loss without touching the graph structure."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from conftest import require_data
from graphs import GRAPHS, cases
from oracles import check_model_full, random_feeds, run

from onnxcc.errors import CalibrationError, UnsupportedModelError, UsageError
from onnxcc.config import FinetuneConfig
from onnxcc.finetuning import finetune, finetune_verified, load_npz, run_finetune_cli

try:
    import torch
except ImportError:  # torch is an optional extra: only the tests below that need it skip
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install 'onnxcc[torch]')")
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny graphs: a second intra-op thread only adds contention (100x slower on a busy 2-core box).
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.dtype.kind not in "fc":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
    allowed = ATOL + RTOL * float(np.abs(want).max() if want.size else 0.0)
    assert diff <= allowed, f"{what}: max |torch - onnxruntime| = {diff:.3g} > {allowed:.3g}"


def _torch_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnxcc.finetuning.executor import OnnxModule

    module = OnnxModule(model)
    with torch.no_grad():
        outs = module(*(torch.from_numpy(feeds[n]) for n in module.input_names))
    return [o.numpy() for o in outs]


def _check_round_trip(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """torch matches onnxruntime; exporting the untrained weights gives back the same model."""
    from onnxcc.finetuning.executor import OnnxModule, export_weights

    want = run(model, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(*(torch.from_numpy(feeds[n]) for n in module.input_names))
    for k, (g, w) in enumerate(zip(got, want)):
        _assert_close(g.numpy(), w, f"output {k}")
    exported = export_weights(module, model)
    check_model_full(exported)
    _assert_same_structure(exported, model)
    for a, b in zip(run(exported, feeds), want):
        np.testing.assert_array_equal(a, b)


def _structure(model: onnx.ModelProto):
    g = model.graph
    return (model.ir_version, model.producer_name, [(o.domain, o.version) for o in model.opset_import],
            [n.SerializeToString() for n in g.node if n.op_type != "Constant"],
            [(n.name, list(n.output)) for n in g.node if n.op_type == "Constant"],
            [(t.name, list(t.dims), t.data_type) for t in g.initializer],
            [i.SerializeToString() for i in g.input], [o.SerializeToString() for o in g.output])


def _assert_same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    assert _structure(a) == _structure(b)


# ============================================================================ round trips
@needs_torch
@pytest.mark.parametrize("name,opset", cases())
def test_round_trip_test_graphs(name, opset):
    model = GRAPHS[name](opset)
    _check_round_trip(model, random_feeds(model))


def _emptied_cases() -> list:
    from engine_helpers import normalized_analysis

    return [c for c in cases() if any(g.droppable for g in normalized_analysis(GRAPHS[c[0]](c[1]))[1].groups.values())]


@needs_torch
@pytest.mark.parametrize("name,opset", _emptied_cases())
def test_round_trip_emptied_branches(name, opset):
    """What compress emits where a branch is emptied (reducers folded to constants, joins as unit
    depthwise Convs) fine-tunes like any other graph."""
    from engine_helpers import normalized_analysis, random_keep

    from onnxcc.passes.prune import PruneChannelsPass

    norm, a = normalized_analysis(GRAPHS[name](opset))
    keep = random_keep(a, seed=opset)
    keep.update({gid: np.zeros(g.size, bool) for gid, g in a.groups.items() if g.droppable})
    pruned = PruneChannelsPass(a, keep)(norm).model
    _check_round_trip(pruned, random_feeds(pruned))


@needs_torch
@pytest.mark.realmodel
@pytest.mark.parametrize("name", list(models.CORPUS))
def test_round_trip_corpus(name):
    require_data(name)
    model = onnx.load(str(models.model_path(name)))
    _check_round_trip(model, random_feeds(model, batch=2))  # batch 2 exercises the dynamic batch dim


def _one(op: str, opset: int, inputs: dict, out_type: int = TensorProto.FLOAT, n_out: int = 1, **attrs):
    """A one-node model: tuple values are float graph inputs of that shape, arrays initializers, None ''."""
    graph_inputs, inits, names = [], [], []
    for k, v in inputs.items():
        if v is None:
            names.append("")
            continue
        names.append(k)
        if isinstance(v, tuple):
            graph_inputs.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)))
        else:
            inits.append(numpy_helper.from_array(np.asarray(v), k))
    outs = [f"y{i}" for i in range(n_out)]
    graph = helper.make_graph([helper.make_node(op, names, outs, name=op.lower(), **attrs)], op.lower(),
                              graph_inputs, [helper.make_tensor_value_info(o, out_type, None) for o in outs],
                              initializer=inits)
    imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = helper.find_min_ir_version_for(imports)
    return model


X, IMG = (2, 3, 4), (1, 2, 7, 7)
I64, F32 = np.int64, np.float32
BIG = np.iinfo(np.int64).max


def _i(*v):
    return np.array(v, dtype=I64)


def _f(*v):
    return np.array(v, dtype=F32)


def _w(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(F32)


# Ops and attribute forms the test graphs and the corpus do not reach.
ZOO = {
    **{op: _one(op, 13, {"x": X}) for op in ("Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Floor",
                                             "Ceil", "Softplus", "Tanh", "Erf", "Sigmoid", "Identity")},
    "Mish": _one("Mish", 18, {"x": X}),
    "Gelu": _one("Gelu", 20, {"x": X}),
    "Gelu-tanh": _one("Gelu", 20, {"x": X}, approximate="tanh"),
    "HardSwish": _one("HardSwish", 14, {"x": X}),
    "LeakyRelu-default": _one("LeakyRelu", 13, {"x": X}),
    "PRelu-scalar": _one("PRelu", 13, {"x": X, "s": _f(0.2)}),
    "Clip-none": _one("Clip", 13, {"x": X}),
    "Clip-max-only": _one("Clip", 13, {"x": X, "lo": None, "hi": np.array(0.5, F32)}),
    "Clip-both": _one("Clip", 13, {"x": X, "lo": np.array(-0.5, F32), "hi": np.array(1.5, F32)}),
    "Clip-6-attributes": _one("Clip", 6, {"x": X}, min=0.0, max=1.0),
    "Clip-min-above-max": _one("Clip", 13, {"x": X, "lo": np.array(1.0, F32), "hi": np.array(0.5, F32)}),
    "Pow": _one("Pow", 13, {"x": X, "p": np.array(2.0, F32)}),
    "Pow-int-exponent": _one("Pow", 15, {"x": X, "p": np.array(3, I64)}),
    "Max": _one("Max", 13, {"a": X, "b": (3, 1), "c": (4,)}),
    "Min": _one("Min", 13, {"a": X, "b": (3, 1)}),
    "Sum": _one("Sum", 13, {"a": X, "b": (4,), "c": X}),
    "Mean": _one("Mean", 13, {"a": X, "b": (4,)}),
    "Greater": _one("Greater", 13, {"a": X, "b": _f(0.0)}, out_type=TensorProto.BOOL),
    "Less": _one("Less", 13, {"a": X, "b": (3, 1)}, out_type=TensorProto.BOOL),
    "Equal": _one("Equal", 13, {"a": _i(1, 2, 3), "b": _i(1, 0, 3)}, out_type=TensorProto.BOOL),
    "GreaterOrEqual": _one("GreaterOrEqual", 16, {"a": X, "b": _f(0.5)}, out_type=TensorProto.BOOL),
    "LessOrEqual": _one("LessOrEqual", 16, {"a": X, "b": (4,)}, out_type=TensorProto.BOOL),
    "Not": _one("Not", 13, {"a": np.array([True, False])}, out_type=TensorProto.BOOL),
    "And": _one("And", 13, {"a": np.array([True, False, True]), "b": np.array([True, True, False])},
                out_type=TensorProto.BOOL),
    "Or": _one("Or", 13, {"a": np.array([True, False, False]), "b": np.array([True, True, False])},
               out_type=TensorProto.BOOL),
    "Where": _one("Where", 13, {"c": np.array([True, False, True, False]), "a": X, "b": (4,)}),
    "Div-int": _one("Div", 13, {"a": _i(7, -7, 9), "b": _i(2, 2, -4)}, out_type=TensorProto.INT64),
    "Softmax-11-coerced": _one("Softmax", 11, {"x": X}, axis=1),
    "Softmax-11-default": _one("Softmax", 11, {"x": X}),
    "Softmax-13-axis1": _one("Softmax", 13, {"x": X}, axis=1),
    "LogSoftmax-9": _one("LogSoftmax", 9, {"x": X}, axis=1),
    "LogSoftmax-13": _one("LogSoftmax", 13, {"x": X}),
    "Split-equal": _one("Split", 13, {"x": X}, n_out=2, axis=2),
    "Split-num-outputs": _one("Split", 18, {"x": (2, 7)}, n_out=3, axis=1, num_outputs=3),
    "Slice-reverse": _one("Slice", 13, {"x": X, "s": _i(-1), "e": _i(-BIG), "a": _i(2), "st": _i(-1)}),
    "Slice-huge-step2": _one("Slice", 13, {"x": X, "s": _i(1, 0), "e": _i(BIG, -1), "a": _i(2, 0),
                                           "st": _i(2, 1)}),
    "Slice-no-axes": _one("Slice", 13, {"x": X, "s": _i(0, 1), "e": _i(1, 3)}),
    "Slice-9-negative": _one("Slice", 9, {"x": X}, starts=[-3], ends=[-1], axes=[-1]),
    "MaxPool-ceil-asym": _one("MaxPool", 13, {"x": IMG}, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1],
                              ceil_mode=1),
    "MaxPool-same-upper": _one("MaxPool", 13, {"x": IMG}, kernel_shape=[3, 3], strides=[2, 2],
                               auto_pad="SAME_UPPER"),
    "MaxPool-dilated": _one("MaxPool", 13, {"x": IMG}, kernel_shape=[2, 2], dilations=[2, 2]),
    "MaxPool-1d": _one("MaxPool", 13, {"x": (1, 2, 9)}, kernel_shape=[3], strides=[2], pads=[1, 1]),
    "AveragePool-include-pad": _one("AveragePool", 13, {"x": IMG}, kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 1, 1, 1], count_include_pad=1),
    "AveragePool-exclude-pad-ceil": _one("AveragePool", 13, {"x": IMG}, kernel_shape=[3, 3], strides=[2, 2],
                                         pads=[1, 0, 0, 1], ceil_mode=1),
    "AveragePool-same-lower": _one("AveragePool", 13, {"x": IMG}, kernel_shape=[2, 2], strides=[2, 2],
                                   auto_pad="SAME_LOWER"),
    "GlobalMaxPool-3d": _one("GlobalMaxPool", 13, {"x": (1, 2, 3, 4, 5)}),
    "ReduceMean-no-keepdims": _one("ReduceMean", 13, {"x": X}, axes=[-1], keepdims=0),
    "ReduceSum-axes-input": _one("ReduceSum", 13, {"x": X, "a": _i(0, 2)}),
    "ReduceMax-18": _one("ReduceMax", 18, {"x": X, "a": _i(1)}, keepdims=0),
    "ReduceMin": _one("ReduceMin", 13, {"x": X}, axes=[0, -1]),
    "ReduceMax-all": _one("ReduceMax", 13, {"x": X}),
    "ReduceSum-noop": _one("ReduceSum", 13, {"x": X}, noop_with_empty_axes=1),
    "Resize-sizes-nearest": _one("Resize", 13, {"x": IMG, "roi": None, "sc": None, "sz": _i(1, 2, 9, 4)}),
    "Resize-down-asym-floor": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 0.5, 0.5)},
                                   coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "Resize-align-corners-ceil": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 1.5, 2)},
                                      coordinate_transformation_mode="align_corners", nearest_mode="ceil"),
    "Resize-tf-half-pixel-nn": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 2, 0.6)},
                                    coordinate_transformation_mode="tf_half_pixel_for_nn",
                                    nearest_mode="round_prefer_ceil"),
    "Resize-linear-half-pixel": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 2, 2)}, mode="linear"),
    "Resize-linear-down": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 0.6, 0.5)}, mode="linear"),
    "Resize-linear-align-corners": _one("Resize", 13, {"x": IMG, "roi": None, "sc": None, "sz": _i(1, 2, 12, 5)},
                                        mode="linear", coordinate_transformation_mode="align_corners"),
    "Resize-linear-pytorch": _one("Resize", 13, {"x": IMG, "roi": None, "sc": _f(1, 1, 1.7, 3)}, mode="linear",
                                  coordinate_transformation_mode="pytorch_half_pixel"),
    "Resize-linear-asym": _one("Resize", 11, {"x": IMG, "roi": _f(), "sc": _f(1, 1, 2, 3)}, mode="linear",
                               coordinate_transformation_mode="asymmetric"),
    "Resize-18-axes": _one("Resize", 18, {"x": IMG, "roi": None, "sc": _f(2, 3)}, axes=[2, 3]),
    "Resize-10-down": _one("Resize", 10, {"x": IMG, "sc": _f(1, 1, 0.5, 0.6)}),
    "Resize-10-linear": _one("Resize", 10, {"x": IMG, "sc": _f(1, 1, 2, 2)}, mode="linear"),
    "Upsample-9-linear": _one("Upsample", 9, {"x": IMG, "sc": _f(1, 1, 2, 3)}, mode="linear"),
    "Pad-reflect": _one("Pad", 13, {"x": IMG, "p": _i(0, 0, 1, 2, 0, 0, 2, 1)}, mode="reflect"),
    "Pad-edge": _one("Pad", 13, {"x": IMG, "p": _i(0, 0, 3, 0, 0, 0, 0, 2)}, mode="edge"),
    "Pad-9-reflect": _one("Pad", 9, {"x": IMG}, pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
    "Pad-value-crop": _one("Pad", 13, {"x": IMG, "p": _i(0, 1, -1, 2, 1, 0, 2, -2), "v": np.array(1.5, F32)}),
    "Pad-18-axes": _one("Pad", 18, {"x": IMG, "p": _i(1, 2, 0, 3), "v": None, "a": _i(-1, 1)}),
    "Pad-19-wrap": _one("Pad", 19, {"x": IMG, "p": _i(0, 0, 1, 2, 0, 0, 2, 1)}, mode="wrap"),
    "Conv-same-upper-s2": _one("Conv", 13, {"x": IMG, "w": _w(4, 2, 3, 3)}, auto_pad="SAME_UPPER", strides=[2, 2]),
    "Conv-same-lower": _one("Conv", 13, {"x": IMG, "w": _w(4, 2, 2, 2)}, auto_pad="SAME_LOWER"),
    "Conv-valid-dilated": _one("Conv", 13, {"x": IMG, "w": _w(4, 2, 3, 3), "b": _w(4)}, auto_pad="VALID",
                               dilations=[2, 1]),
    "Conv-asym-pads": _one("Conv", 13, {"x": IMG, "w": _w(4, 1, 3, 3)}, pads=[0, 1, 2, 0], group=2, strides=[2, 1]),
    "Conv-1d": _one("Conv", 13, {"x": (1, 2, 9), "w": _w(3, 2, 3), "b": _w(3)}, pads=[2, 0]),
    "ConvTranspose-output-shape": _one("ConvTranspose", 13, {"x": IMG, "w": _w(2, 3, 3, 3)}, strides=[2, 2],
                                       output_shape=[14, 15]),
    "ConvTranspose-asym-group": _one("ConvTranspose", 13, {"x": IMG, "w": _w(2, 2, 3, 3), "b": _w(4)}, group=2,
                                     strides=[2, 3], pads=[0, 1, 2, 0], output_padding=[1, 2]),
    "ConvTranspose-dilated": _one("ConvTranspose", 13, {"x": IMG, "w": _w(2, 3, 3, 2)}, dilations=[2, 2]),
    "ConvTranspose-same-upper": _one("ConvTranspose", 13, {"x": IMG, "w": _w(2, 3, 3, 3)}, strides=[2, 2],
                                     auto_pad="SAME_UPPER"),
    "Gemm-transA-alpha-beta": _one("Gemm", 13, {"a": (4, 3), "b": _w(4, 5), "c": _w(5)}, transA=1, alpha=0.5,
                                   beta=2.0),
    "MatMul-batched": _one("MatMul", 13, {"a": X, "b": _w(2, 4, 5)}),
    "MatMul-const-left": _one("MatMul", 13, {"a": _w(5, 2), "b": (2, 3)}),
    "InstanceNorm-1d": _one("InstanceNormalization", 13, {"x": (2, 3, 5), "s": _f(1, 2, 3), "b": _f(0, 1, -1)}),
    "BatchNorm-2d": _one("BatchNormalization", 13, {"x": (4, 3), "s": _f(1, 2, 3), "b": _f(0, 1, -1),
                                                    "m": _f(0.1, 0, 0), "v": _f(1, 2, 0.5)}),
    "Transpose-default": _one("Transpose", 13, {"x": X}),
    "Flatten-0": _one("Flatten", 13, {"x": X}, axis=0),
    "Flatten-negative": _one("Flatten", 13, {"x": X}, axis=-1),
    "Reshape-0-minus1": _one("Reshape", 13, {"x": X, "s": _i(0, -1, 2)}),
    "Squeeze-11": _one("Squeeze", 11, {"x": (1, 3, 1)}, axes=[-1]),
    "Squeeze-13": _one("Squeeze", 13, {"x": (1, 3, 1), "a": _i(0)}),
    "Squeeze-all": _one("Squeeze", 13, {"x": (1, 3, 1)}),
    "Unsqueeze-11": _one("Unsqueeze", 11, {"x": X}, axes=[0, 4]),
    "Unsqueeze-13": _one("Unsqueeze", 13, {"x": X, "a": _i(-1, 1)}),
    "Shape-15-slice": _one("Shape", 15, {"x": X}, out_type=TensorProto.INT64, start=1, end=-1),
    "Gather-negative": _one("Gather", 13, {"x": X, "i": _i(-1, 0)}, axis=1),
    "Gather-scalar": _one("Gather", 13, {"x": X, "i": np.array(2, I64)}, axis=2),
    "Cast-int": _one("Cast", 13, {"x": X}, out_type=TensorProto.INT64, to=TensorProto.INT64),
    "Cast-double": _one("Cast", 13, {"x": X}, out_type=TensorProto.DOUBLE, to=TensorProto.DOUBLE),
    "Dropout": _one("Dropout", 13, {"x": X}),
    "ConstantOfShape": _one("ConstantOfShape", 13, {"s": _i(2, 3)},
                            value=numpy_helper.from_array(np.array([1.5], F32))),
    "ConstantOfShape-default": _one("ConstantOfShape", 13, {"s": _i(3)}),
    "Expand": _one("Expand", 13, {"x": (3, 1), "s": _i(2, 1, 4)}),
    "Range": _one("Range", 13, {"a": np.array(1.0, F32), "b": np.array(7.5, F32), "d": np.array(1.5, F32)}),
    "Tile": _one("Tile", 13, {"x": X, "r": _i(2, 1, 3)}),
    "LpNormalization-p1": _one("LpNormalization", 13, {"x": X}, axis=1, p=1),
    "DepthToSpace-DCR": _one("DepthToSpace", 13, {"x": (1, 8, 3, 3)}, blocksize=2),
    "DepthToSpace-CRD": _one("DepthToSpace", 13, {"x": (1, 8, 3, 3)}, blocksize=2, mode="CRD"),
    "SpaceToDepth": _one("SpaceToDepth", 13, {"x": (1, 2, 4, 6)}, blocksize=2),
    # the ops the channel analysis accepts beyond the corpus (compress --finetune must run them all)
    **{op: _one(op, 13, {"x": X}) for op in ("Sin", "Cos", "Sign", "Softsign", "Elu", "Selu", "Round")},
    "Celu": _one("Celu", 13, {"x": X}, alpha=0.7),
    "ThresholdedRelu": _one("ThresholdedRelu", 13, {"x": X}, alpha=0.3),
    "IsNaN": _one("IsNaN", 13, {"x": X}, out_type=TensorProto.BOOL),
    "IsInf-negative": _one("IsInf", 13, {"x": _f(1, -np.inf, np.inf, 0)}, out_type=TensorProto.BOOL,
                           detect_positive=0),
    "Xor": _one("Xor", 13, {"a": np.array([True, False, True]), "b": np.array([True, True, False])},
                out_type=TensorProto.BOOL),
    "Mod-int": _one("Mod", 13, {"a": _i(7, -7, 9), "b": _i(2, 3, -4)}, out_type=TensorProto.INT64),
    "Mod-fmod": _one("Mod", 13, {"a": X, "b": _f(0.7)}, fmod=1),
    "BitShift": _one("BitShift", 13, {"a": np.array([1, 8, 3], np.uint8), "b": np.array([2, 1, 0], np.uint8)},
                     out_type=TensorProto.UINT8, direction="LEFT"),
    "Size": _one("Size", 13, {"x": X}, out_type=TensorProto.INT64),
    "Hardmax-13": _one("Hardmax", 13, {"x": X}, axis=1),
    "Hardmax-11-coerced": _one("Hardmax", 11, {"x": X}, axis=1),
    "ArgMax-last": _one("ArgMax", 13, {"x": _f(1, 3, 3, 0)}, out_type=TensorProto.INT64, select_last_index=1),
    "ArgMin": _one("ArgMin", 13, {"x": X}, out_type=TensorProto.INT64, axis=2, keepdims=0),
    "LpPool": _one("LpPool", 13, {"x": IMG}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], p=2),
    "GlobalLpPool": _one("GlobalLpPool", 13, {"x": IMG}, p=1),
    "ReduceProd": _one("ReduceProd", 13, {"x": X}, axes=[0, 2]),
    "ReduceL1": _one("ReduceL1", 13, {"x": X}, axes=[1]),
    "ReduceL2": _one("ReduceL2", 18, {"x": X, "a": _i(-1)}, keepdims=0),
    "ReduceSumSquare": _one("ReduceSumSquare", 13, {"x": X}),
    "ReduceLogSum": _one("ReduceLogSum", 13, {"x": X}, axes=[2]),
    "ReduceLogSumExp": _one("ReduceLogSumExp", 13, {"x": X}, axes=[0, 1]),
}


@needs_torch
@pytest.mark.parametrize("case", list(ZOO))
def test_op_matches_onnxruntime(case):
    model = ZOO[case]
    rng = np.random.default_rng(0)
    # positive inputs keep Log/Sqrt/Reciprocal/Pow finite; the sign still varies for the others
    low = 0.2 if case in ("Log", "Sqrt", "Reciprocal", "Pow", "ReduceLogSum") else -2.0
    feeds = {i.name: rng.uniform(low, 2.0, [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(F32)
             for i in model.graph.input}
    for k, (g, w) in enumerate(zip(_torch_outputs(model, feeds), run(model, feeds))):
        _assert_close(g, w, f"{case} output {k}")


def _dynamic_shape_model() -> onnx.ModelProto:
    """x(N,3,4,4) -> Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape -> MatMul, plus
    ConstantOfShape/Where/Greater on the dynamic batch and an Expand to it."""
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["shape"]),
        n("Gather", ["shape", "zero"], ["batch"], axis=0),
        n("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        n("Concat", ["batch1", "minus1"], ["flat_shape"], axis=0),
        n("Reshape", ["x", "flat_shape"], ["flat"]),
        n("MatMul", ["flat", "W"], ["mm"]),
        n("Concat", ["batch1", "five"], ["ones_shape"], axis=0),
        n("ConstantOfShape", ["ones_shape"], ["ones"], value=numpy_helper.from_array(np.array([0.5], F32))),
        n("Greater", ["mm", "ones"], ["pos"]),
        n("Where", ["pos", "mm", "ones"], ["y"]),
        n("Expand", ["bias", "ones_shape"], ["bias_n"]),
        n("Add", ["y", "bias_n"], ["out"]),
    ]
    inits = [numpy_helper.from_array(a, k) for k, a in
             {"zero": np.array(0, I64), "axes0": _i(0), "minus1": _i(-1), "five": _i(5), "W": _w(48, 5),
              "bias": _w(1, 5, seed=1)}.items()]
    graph = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@needs_torch
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_shape_subgraph_with_dynamic_batch(batch):
    model = _dynamic_shape_model()
    _check_round_trip(model, random_feeds(model, batch=batch))


@needs_torch
def test_every_op_the_channel_analysis_accepts_is_run_here():
    """Each op the analysis has a rule for (and the executor runs: tests/test_ops.py) is run by
    the executor against onnxruntime in this file's op zoo or the graph corpus."""
    from onnxcc.ops import OPS

    OPS.load("channel_rule")
    ruled = {s.op for s in OPS if s.channel_rule and not s.not_trainable}
    tested = {n.op_type for m in ZOO.values() for n in m.graph.node}
    corpus = {n.op_type for name in GRAPHS for n in GRAPHS[name](13).graph.node}
    assert ruled <= tested | corpus, sorted(ruled - tested - corpus)


@needs_torch
def test_channels_last_weights_change_nothing_but_memory_order():
    """Recovery trains 2-D convolutions on channels-last weights: same outputs, and what is
    exported after a step is the parameters' values in ONNX order (1-D and 3-D weights stay)."""
    from onnxcc.finetuning.executor import OnnxModule, export_weights

    for model in (ZOO["Conv-valid-dilated"], _one("Conv", 13, {"x": (1, 2, 9), "w": _w(4, 2, 3)}),
                  _one("Conv", 13, {"x": (1, 2, 5, 5, 5), "w": _w(4, 2, 3, 3, 3)})):
        x = {i.name: torch.from_numpy(_w(*[d.dim_value for d in i.type.tensor_type.shape.dim], seed=1))
             for i in model.graph.input}
        plain, fast = OnnxModule(model), OnnxModule(model).channels_last()
        w = fast.onnx_parameters()["w"]
        assert w.is_contiguous(memory_format=torch.channels_last) == (w.dim() == 4)
        y = fast(x)[0]
        torch.testing.assert_close(y, plain(x)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(numpy_helper.to_array(export_weights(fast, model).graph.initializer[0]),
                                      numpy_helper.to_array(model.graph.initializer[0]))
        y.square().sum().backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
        out = numpy_helper.to_array(export_weights(fast, model).graph.initializer[0])
        np.testing.assert_array_equal(out, w.detach().numpy())
        assert not np.array_equal(out, numpy_helper.to_array(model.graph.initializer[0]))


def test_unsupported_op_is_one_line_error():
    from onnxcc.finetuning.executor import OnnxModule

    model = _one("Einsum", 13, {"a": (2, 3), "b": (3, 4)}, equation="ij,jk->ik")
    with pytest.raises(UnsupportedModelError, match="Einsum") as e:
        OnnxModule(model)
    assert "\n" not in str(e.value)
    model.graph.node[0].domain = "com.microsoft"
    with pytest.raises(UnsupportedModelError, match="com.microsoft:Einsum"):
        OnnxModule(model)
    indices = _one("MaxPool", 13, {"x": IMG}, n_out=2, kernel_shape=[2, 2])
    with pytest.raises(UnsupportedModelError, match="output #1"):
        OnnxModule(indices)(torch.zeros(IMG))


@needs_torch
def test_parameters_buffers_and_reversible_names():
    from onnxcc.finetuning.executor import OnnxModule, export_weights

    model = GRAPHS["per_channel_consts"](13)
    renames = {t.name: n for t, n in zip(model.graph.initializer,
                                         ["layer.0/conv:weight", "training", "1bias", "forward", "a.b", "a_b"])}
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    module = OnnxModule(model)
    assert set(module.torch_names) == {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    assert all(module.onnx_names[v] == k for k, v in module.torch_names.items())
    assert all(k.isidentifier() for k in module.state_dict())
    trainable = set(module.onnx_parameters())
    assert {"layer.0/conv:weight", "training", "1bias", "a_b"} <= trainable  # conv weights/bias, per-channel Add
    assert {"forward", "a.b"}.isdisjoint(trainable)  # per-channel Sub/Div constants stay fixed
    scalars = {i for n in model.graph.node if n.op_type in ("Add", "Mul") for i in n.input
               if i in module.torch_names and getattr(module, module.torch_names[i]).numel() == 1}
    assert scalars and not scalars & trainable  # scalar constants stay fixed
    mul_const = next(n.input[0] for n in model.graph.node if n.op_type == "Mul")  # a per-channel Constant node
    assert mul_const in trainable
    feeds = random_feeds(model)
    _check_round_trip(model, feeds)
    with torch.no_grad():
        module.onnx_parameters()[mul_const].mul_(2.0)
    changed = export_weights(module, model)
    const = next(n for n in changed.graph.node if n.output[0] == mul_const)
    original = next(n for n in model.graph.node if n.output[0] == mul_const)
    np.testing.assert_array_equal(numpy_helper.to_array(const.attribute[0].t),
                                  2.0 * numpy_helper.to_array(original.attribute[0].t))


# =============================================================================== training
def _perturbed(model: onnx.ModelProto, scale: float = 0.3, seed: int = 1) -> onnx.ModelProto:
    """A stand-in for a compressed student: the same graph with noisy conv weights."""
    rng = np.random.default_rng(seed)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            noisy = a + scale * a.std() * rng.standard_normal(a.shape)
            t.CopyFrom(numpy_helper.from_array(noisy.astype(F32), t.name))
    return out


def _kd(student: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray, temperature: float = 4.0) -> float:
    """Distillation loss measured independently with onnxruntime and numpy."""
    def log_softmax(z):
        z = z / temperature - (z / temperature).max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    s = np.concatenate([run(student, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    t = np.concatenate([run(teacher, {"x": x[i:i + 1]})[0] for i in range(len(x))])
    ls, lt = log_softmax(s), log_softmax(t)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean() * temperature ** 2)


@needs_torch
def test_finetune_lowers_distillation_loss_and_keeps_structure():
    teacher = GRAPHS["tiny_resnet"](13)
    student = _perturbed(teacher)
    x = np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(F32)
    calls = []
    tuned, history = finetune(student, teacher, {"x": x}, {"x": x}, epochs=2, lr=3e-3, batch_size=8,
                              progress=lambda *a: calls.append(a))
    assert [r["epoch"] for r in history["epochs"]] == [1, 2]
    assert history["selected_by"] == "val_loss" and history["best_epoch"] >= 1
    assert history["epochs"][-1]["val_loss"] < history["initial"]["val_loss"]
    assert calls[-1][1:] == (4, 4)
    before, after = _kd(student, teacher, x), _kd(tuned, teacher, x)
    assert after < 0.7 * before, (before, after)
    check_model_full(tuned)
    _assert_same_structure(tuned, student)
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(tuned.graph.initializer, student.graph.initializer))


def _with_softmax(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a Softmax after its (N, classes) output, as classifiers are often exported."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    logits = out.graph.output[0]
    out.graph.node.append(helper.make_node("Softmax", [logits.name], ["probs"], name="softmax", axis=1))
    probs = onnx.ValueInfoProto()
    probs.CopyFrom(logits)
    probs.name = "probs"
    out.graph.output[0].CopyFrom(probs)
    return out


def test_heads_distil_logits_before_softmax():
    from onnxcc.finetuning.heads import Head as _Head, heads as _heads

    logits = GRAPHS["tiny_resnet"](11).graph.output[0].name
    assert _heads(GRAPHS["tiny_resnet"](11)) == [_Head(logits, 1, False)]
    assert _heads(_with_softmax(GRAPHS["tiny_resnet"](11))) == [_Head(logits, 1, True)]  # coerced before 13
    assert _heads(_with_softmax(GRAPHS["tiny_resnet"](13))) == [_Head(logits, 1, False)]
    multi = GRAPHS["multi_output"](13)
    assert [h.axis for h in _heads(multi)] == [None, 1]  # feature map: MSE; (1, 4) scores: KL


@needs_torch
def test_finetune_with_labels_keeps_best_epoch(tmp_path):
    teacher = _with_softmax(GRAPHS["tiny_resnet"](11))
    student = _perturbed(teacher)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, 16, 16)).astype(F32)
    y = np.concatenate([np.argmax(run(teacher, {"x": x[i:i + 1]})[0], axis=1) for i in range(len(x))])
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "val.npz", x=x, y=y)
    onnx.save(student, tmp_path / "student.onnx")
    onnx.save(teacher, tmp_path / "teacher.onnx")
    out = tmp_path / "tuned.onnx"
    result = run_finetune_cli(tmp_path / "student.onnx", tmp_path / "teacher.onnx", tmp_path / "train.npz", out,
                              tmp_path / "val.npz", FinetuneConfig(epochs=2, lr=3e-3, batch_size=4))
    h = result["history"]
    assert result["output"] == str(out) and h["selected_by"] == "val_acc"
    accs = [h["initial"]["val_acc"]] + [r["val_acc"] for r in h["epochs"]]
    assert accs[h["best_epoch"]] == max(accs)
    tuned = onnx.load(out)
    check_model_full(tuned)
    _assert_same_structure(tuned, student)
    assert not list(tmp_path.glob(".tuned.onnx.*"))  # atomic save leaves no temp file
    with pytest.raises(UsageError, match="overwrite"):
        run_finetune_cli(tmp_path / "student.onnx", tmp_path / "teacher.onnx", tmp_path / "train.npz",
                         tmp_path / "student.onnx")


@needs_torch
def test_finetune_dense_output_uses_mse():
    teacher = GRAPHS["conv_bn"](13)
    student = _perturbed(teacher)
    x = np.random.default_rng(0).standard_normal((8, 3, 10, 10)).astype(F32)
    tuned, history = finetune(student, teacher, {"x": x}, {"x": x}, epochs=2, lr=3e-3, batch_size=4)

    def mse(m):
        return float(np.mean([(run(m, {"x": x[i:i + 1]})[0] - run(teacher, {"x": x[i:i + 1]})[0]) ** 2
                              for i in range(len(x))]))

    assert mse(tuned) < mse(student)
    assert history["initial"]["val_loss"] == pytest.approx(mse(student), rel=1e-3)
    _assert_same_structure(tuned, student)


@needs_torch
@pytest.mark.realmodel
def test_finetune_corpus_detection_model():
    require_data("yolo_like")
    teacher = onnx.load(str(models.model_path("yolo_like")))
    student = _perturbed(teacher, 0.1)
    x = np.random.default_rng(0).standard_normal((4, 3, 160, 160)).astype(F32)
    tuned, history = finetune(student, teacher, {"x": x}, {"x": x}, epochs=1, lr=1e-3, batch_size=4)
    assert history["best_epoch"] == 1 and history["epochs"][0]["val_loss"] < history["initial"]["val_loss"]
    check_model_full(tuned)
    _assert_same_structure(tuned, student)


@needs_torch
def test_finetune_rejects_data_of_the_wrong_shape():
    model = GRAPHS["tiny_resnet"](13)
    with pytest.raises(CalibrationError, match="expects"):
        finetune(model, model, {"x": np.zeros((2, 3, 8, 8), F32)})
    with pytest.raises(CalibrationError, match="class indices"):
        finetune(model, model, {"x": np.zeros((2, 3, 16, 16), F32), "y": np.array([0, 10])})


def _two_inputs() -> onnx.ModelProto:
    """A Siamese-style classifier: two images, one shared trunk, a dense head on their difference."""
    from graphs import GraphBuilder

    g = GraphBuilder(13, 0, "two_inputs")
    a, b = g.input((1, 3, 8, 8), "a"), g.input((1, 3, 8, 8), "b")
    w = g.init(g.weight((6, 3, 3, 3), 27), "W_trunk")
    fa, fb = (g.flatten(g.gap(g.relu(g.conv(t, 6, 3, bias=False, weight=w)))) for t in (a, b))
    return g.build(g.gemm(g.node("Sub", [fa, fb], g.shapes[fa]), 4))


@needs_torch
def test_a_two_input_model_fine_tunes_from_arrays_named_after_its_inputs(tmp_path):
    teacher = _two_inputs()
    student = _perturbed(teacher, scale=0.5)
    rng = np.random.default_rng(0)
    data = {k: rng.standard_normal((48, 3, 8, 8)).astype(F32) for k in ("a", "b")}

    def kd(model):   # the graph is declared at batch 1
        one = [{k: v[i:i + 1] for k, v in data.items()} for i in range(len(data["a"]))]
        return float(np.mean([((run(model, f)[0] - run(teacher, f)[0]) ** 2).mean() for f in one]))
    tuned, history = finetune_verified(student, teacher, data, epochs=4, lr=3e-3, batch_size=16)
    assert kd(tuned) < 0.7 * kd(student)
    assert [i.name for i in tuned.graph.initializer] == [i.name for i in student.graph.initializer]
    with pytest.raises(CalibrationError, match=r"no array for input\(s\) \['b'\]"):
        finetune(student, teacher, {"a": data["a"]})
    np.savez(tmp_path / "pairs.npz", **data)
    assert set(load_npz(tmp_path / "pairs.npz")) == {"a", "b"}


@needs_torch
def test_a_npy_trains_memory_mapped(tmp_path):
    teacher = GRAPHS["tiny_resnet"](13)
    x = np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(F32)
    np.save(tmp_path / "x.npy", x)
    data = load_npz(tmp_path / "x.npy")
    assert isinstance(data["x"], np.memmap)
    tuned, _ = finetune(_perturbed(teacher), teacher, data, epochs=1, batch_size=8)
    check_model_full(tuned)


def test_verify_rejects_non_finite_weights():
    from onnxcc.errors import VerificationError
    from onnxcc.finetuning.train import _verify

    model = GRAPHS["tiny_resnet"](13)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    w = broken.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(np.full(tuple(w.dims), np.nan, F32), w.name))
    x = {"x": np.zeros((1, 3, 16, 16), F32)}
    _verify(model, model, x)
    with pytest.raises(VerificationError, match="NaN"):
        _verify(broken, model, x)


def test_missing_torch_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    model = GRAPHS["tiny_resnet"](13)
    with pytest.raises(UsageError, match=r"fine-tuning needs torch: pip install 'onnxcc\[torch\]'"):
        finetune(model, model, {"x": np.zeros((2, 3, 16, 16), F32)})


# ==================================================================================== data
def _npz(tmp_path, **arrays):
    p = tmp_path / "data.npz"
    np.savez(p, **arrays)
    return p


def test_load_npz_ok(tmp_path):
    x = np.ones((3, 2, 4), F32)
    data = load_npz(_npz(tmp_path, x=x, y=np.array([0, 2, 1], np.int32)))
    np.testing.assert_array_equal(data["x"], x)
    assert data["y"].dtype == np.int64 and data["y"].tolist() == [0, 2, 1]
    assert set(load_npz(_npz(tmp_path, x=x))) == {"x"}


@pytest.mark.parametrize("arrays,match", [
    (dict(y=np.array([0, 1])), "no input arrays.*y"),
    (dict(a=np.ones((2, 3), F32), b=np.ones((3, 3), F32)), "'a' must be .* like the others"),
    (dict(x=np.array([[1.0, np.nan]], F32)), "NaN or Inf"),
    (dict(x=np.array([[1.0, np.inf]], F32)), "NaN or Inf"),
    (dict(x=np.ones((3, 2), F32), y=np.array([0, 1])), r"'y' must have shape \(3,\)"),
    (dict(x=np.ones((2, 2), F32), y=np.array([[0], [1]])), r"'y' must have shape \(2,\)"),
    (dict(x=np.ones((2, 2), F32), y=np.array([0.0, 1.0])), "integer class indices"),
    (dict(x=np.ones((2, 2), F32), y=np.array([0, -1])), "integer class indices"),
    (dict(x=np.ones(4, F32)), r"\(N, \.\.\.\)"),
])
def test_load_npz_rejects_bad_data(tmp_path, arrays, match):
    with pytest.raises(CalibrationError, match=match):
        load_npz(_npz(tmp_path, **arrays))


def test_load_npz_rejects_bad_files(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        load_npz(tmp_path / "garbage.npz")
    np.save(tmp_path / "plain.npy", np.ones((2, 3), F32))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(CalibrationError, match="plain array"):
        load_npz(tmp_path / "plain.npz")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CalibrationError, match="not a readable .npy"):
        load_npz(tmp_path / "bad.npy")


def test_auto_device_trains_on_the_cpu_when_torch_sees_no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    teacher = GRAPHS["tiny_resnet"](13)
    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(F32)
    _, history = finetune(teacher, teacher, {"x": x}, epochs=1, batch_size=2, device="auto")
    assert len(history["epochs"]) == 1
    with pytest.raises(UsageError, match="sees no CUDA GPU"):
        finetune(teacher, teacher, {"x": x}, epochs=1, batch_size=2, device="cuda")
