"""Run an ONNX graph node by node in torch so that its weights can be trained, then write them back.

:class:`OnnxModule` keeps the ONNX graph as the single source of truth: it does not convert the
model into torch layers, it interprets the same nodes with one torch function per op type,
registered in the op registry (:data:`onnxcc.ops.OPS`) as this module is imported. Weights and
biases of the layers that matter for accuracy (the registry's ``weights`` positions) become
``nn.Parameter``s; every other constant (shapes, axes, scales, BN statistics, ...) is a buffer.
:func:`export_weights` writes the trained values back into the very initializers (or ``Constant``
nodes) they came from, so the fine-tuned model differs from the input only in those numbers.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from ..errors import UnsupportedModelError
from ..ops import OPS

__all__ = ["OnnxModule", "check_supported", "export_weights"]

Tensor = torch.Tensor

_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8, TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64, TensorProto.BOOL: torch.bool,
}

_TRAINABLE_DTYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}


@dataclass(frozen=True)
class Node:
    """One ONNX node with decoded attributes and the model's default-domain opset."""

    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    opset: int

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)


def _node(proto: onnx.NodeProto, opset: int) -> Node:
    attrs = {}
    for a in proto.attribute:
        v = helper.get_attribute_value(a)
        attrs[a.name] = v.decode() if isinstance(v, bytes) else v
    return Node(proto.op_type, proto.name, tuple(proto.input), tuple(proto.output), attrs, opset)


def _dtype(code: int, node: Node) -> torch.dtype:
    if code not in _DTYPES:
        raise UnsupportedModelError(f"{node.op} node {node.name!r}: tensor type "
                                    f"{TensorProto.DataType.Name(code)} is not supported for fine-tuning")
    return _DTYPES[code]


def _from_proto(t: onnx.TensorProto) -> Tensor:
    if t.data_type not in _DTYPES:
        raise UnsupportedModelError(f"tensor {t.name!r} of type {TensorProto.DataType.Name(t.data_type)} "
                                    "is not supported for fine-tuning")
    # numpy_helper may hand back a read-only view of the protobuf bytes; torch wants its own copy
    return torch.from_numpy(np.array(numpy_helper.to_array(t), copy=True))


def _ints(t: Tensor) -> list[int]:
    """A small shape/axes/pads tensor as Python ints (shape subgraphs are computed eagerly)."""
    return [int(v) for v in t.reshape(-1).tolist()]


def _opt_ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else _ints(t)


# ================================================================================== op functions
Handler = Callable[..., "Tensor | Sequence[Tensor]"]


def _register(handlers: Mapping[str, Handler]) -> None:
    for op, fn in handlers.items():
        OPS.executor(op)(fn)


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda n, x: fn(x)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda n, a, b: fn(a, b)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda n, *xs: functools.reduce(fn, xs)


_register({op: _unary(fn) for op, fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Not": torch.logical_not,
    "Softplus": F.softplus, "Mish": F.mish, "Identity": lambda x: x, "Sin": torch.sin, "Cos": torch.cos,
    "Sign": torch.sign, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "Round": torch.round,   # half to even, as ONNX asks
}.items()})

_register({op: _binary(fn) for op, fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Equal": torch.eq, "Greater": torch.gt,
    "Less": torch.lt, "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}.items()})

_register({op: _variadic(fn) for op, fn in {
    "Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add,
}.items()})


@OPS.executor("Mean")
def _mean(n: Node, *xs: Tensor) -> Tensor:
    return functools.reduce(torch.add, xs) / len(xs)


@OPS.executor("Div")
def _div(n: Node, a: Tensor, b: Tensor) -> Tensor:
    # ONNX integer division truncates like C; plain torch.div would return floats
    return torch.div(a, b, rounding_mode=None if a.is_floating_point() else "trunc")


@OPS.executor("Pow")
def _pow(n: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)  # the result has the base's type, whatever the exponent's


@OPS.executor("Mod")
def _mod(n: Node, a: Tensor, b: Tensor) -> Tensor:
    # fmod=1 keeps the dividend's sign (C fmod), fmod=0 the divisor's (Python %)
    return torch.fmod(a, b) if n.attr("fmod", 0) else torch.remainder(a, b)


@OPS.executor("BitShift")
def _bit_shift(n: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.bitwise_left_shift(a, b) if n.attr("direction") == "LEFT" else torch.bitwise_right_shift(a, b)


@OPS.executor("IsInf")
def _is_inf(n: Node, x: Tensor) -> Tensor:
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    return torch.isinf(x) & (((x > 0) & bool(pos)) | ((x < 0) & bool(neg)))


@OPS.executor("Size")
def _size(n: Node, x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@OPS.executor("Where")
def _where(n: Node, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(cond, a, b)


# ----------------------------------------------------------------------------- activations
@OPS.executor("LeakyRelu")
def _leaky_relu(n: Node, x: Tensor) -> Tensor:
    return F.leaky_relu(x, n.attr("alpha", 0.01))


@OPS.executor("PRelu")
def _prelu(n: Node, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)  # slope broadcasts (C,1,1), (1,C,1,1), ... unlike F.prelu


@OPS.executor("Elu")
def _elu(n: Node, x: Tensor) -> Tensor:
    return F.elu(x, n.attr("alpha", 1.0))


@OPS.executor("Celu")
def _celu(n: Node, x: Tensor) -> Tensor:
    return F.celu(x, n.attr("alpha", 1.0))


@OPS.executor("Selu")
def _selu(n: Node, x: Tensor) -> Tensor:
    alpha, gamma = n.attr("alpha", 1.67326319217681884765625), n.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@OPS.executor("ThresholdedRelu")
def _thresholded_relu(n: Node, x: Tensor) -> Tensor:
    return torch.where(x > n.attr("alpha", 1.0), x, torch.zeros_like(x))


@OPS.executor("HardSigmoid")
def _hard_sigmoid(n: Node, x: Tensor) -> Tensor:
    return torch.clamp(x * n.attr("alpha", 0.2) + n.attr("beta", 0.5), 0.0, 1.0)


@OPS.executor("HardSwish")
def _hard_swish(n: Node, x: Tensor) -> Tensor:
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@OPS.executor("Gelu")
def _gelu(n: Node, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=n.attr("approximate", "none"))


@OPS.executor("Clip")
def _clip(n: Node, x: Tensor, lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    if n.opset < 11:  # min/max were attributes before Clip-11
        lo, hi = n.attr("min"), n.attr("max")
    bounds = [_fixed_scalar(b) for b in (lo, hi)]
    if x.is_floating_point() and None not in bounds and bounds[0] <= bounds[1]:
        # ReLU6 and friends: hardtanh's backward is one fused kernel, where clamp's with tensor
        # bounds builds masks from four elementwise ops (over a third of a MobileNetV2 training
        # step on CPU); the two differ only in the gradient at exactly a bound
        return F.hardtanh(x, *bounds)
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


def _fixed_scalar(t: Tensor | float | None) -> float | None:
    """A bound that is one number and takes no gradient, as a float (None otherwise)."""
    if isinstance(t, (int, float)):
        return float(t)
    if isinstance(t, Tensor) and t.numel() == 1 and not t.requires_grad:
        return float(t)
    return None


def _softmax_like(fn: Callable[..., Tensor]) -> Handler:
    def run(n: Node, x: Tensor) -> Tensor:
        if n.opset >= 13:
            return fn(x, dim=n.attr("axis", -1))
        # before opset 13 the input is coerced to 2-D at `axis` and normalised over the second dim
        a = n.attr("axis", 1) % max(x.ndim, 1)
        flat = x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
        return fn(flat, dim=1).reshape(x.shape)
    return run


_register({"Softmax": _softmax_like(torch.softmax), "LogSoftmax": _softmax_like(torch.log_softmax)})


@OPS.executor("Hardmax")
def _hardmax(n: Node, x: Tensor) -> Tensor:
    def one_hot(t: Tensor, *, dim: int) -> Tensor:   # the first maximum, as onnxruntime picks it
        return F.one_hot(t.argmax(dim), t.shape[dim]).movedim(-1, dim).to(t.dtype)
    return _softmax_like(one_hot)(n, x)


def _arg(fn: Callable[..., Tensor]) -> Handler:
    def run(n: Node, x: Tensor) -> Tensor:
        axis, keep = n.attr("axis", 0), bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)
    return run


_register({"ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin)})


@OPS.executor("LpNormalization")
def _lp_normalization(n: Node, x: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(x, ord=n.attr("p", 2), dim=n.attr("axis", -1), keepdim=True)
    return x / torch.where(norm == 0, 1.0, norm)  # all-zero vectors stay zero, as in onnxruntime


# ------------------------------------------------------------------------- conv / linear
def _spatial_pads(n: Node, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dim, resolving auto_pad like onnxruntime."""
    auto = n.attr("auto_pad", "NOTSET")
    nd = len(kernel)
    if auto == "NOTSET":
        p = n.attr("pads", [0] * 2 * nd)
        return list(zip(p[:nd], p[nd:]))
    if auto == "VALID":
        return [(0, 0)] * nd
    pads = []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pads


def _pad_spatial(x: Tensor, pads: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    """Pad the trailing len(pads) dims; negative amounts crop (F.pad lists dims last first)."""
    return F.pad(x, [v for b, e in reversed(pads) for v in (b, e)], value=value)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@OPS.executor("Conv")
def _conv(n: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    k = tuple(w.shape[2:])
    nd = len(k)
    strides, dilations = n.attr("strides", [1] * nd), n.attr("dilations", [1] * nd)
    pads = _spatial_pads(n, x.shape[2:], k, strides, dilations)
    if all(b0 == e0 for b0, e0 in pads):
        padding = [b0 for b0, _ in pads]
    else:  # torch convs only pad symmetrically
        x, padding = _pad_spatial(x, pads), [0] * nd
    return _CONV[nd](x, w, b, strides, padding, dilations, n.attr("group", 1))


def _conv_transpose_pads(n: Node, sizes: Sequence[int], k: Sequence[int], strides: Sequence[int],
                         dilations: Sequence[int], out_pad: Sequence[int]) -> list[tuple[int, int]]:
    auto, out_shape = n.attr("auto_pad", "NOTSET"), n.attr("output_shape")
    nd = len(k)
    if auto == "VALID":
        return [(0, 0)] * nd
    if auto == "NOTSET" and not out_shape:
        p = n.attr("pads", [0] * 2 * nd)
        return list(zip(p[:nd], p[nd:]))
    targets = out_shape[-nd:] if out_shape else [size * s for size, s in zip(sizes, strides)]
    pads = []
    for size, kk, s, d, op, t in zip(sizes, k, strides, dilations, out_pad, targets):
        total = s * (size - 1) + op + (kk - 1) * d + 1 - t
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pads


@OPS.executor("ConvTranspose")
def _conv_transpose(n: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    k = tuple(w.shape[2:])
    nd = len(k)
    strides, dilations = n.attr("strides", [1] * nd), n.attr("dilations", [1] * nd)
    out_pad = n.attr("output_padding", [0] * nd)
    pads = _conv_transpose_pads(n, x.shape[2:], k, strides, dilations, out_pad)
    # Full (unpadded) result, then crop the pads and grow by output_padding: this handles
    # asymmetric pads and output_padding >= stride, which torch's arguments cannot express.
    y = _CONV_T[nd](x, w, None, strides, 0, 0, n.attr("group", 1), dilations)
    y = _pad_spatial(y, [(-pb, op - pe) for (pb, pe), op in zip(pads, out_pad)])
    return y if b is None else y + b.reshape(1, -1, *[1] * nd)


@OPS.executor("Gemm")
def _gemm(n: Node, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.t() if n.attr("transA", 0) else a
    b = b.t() if n.attr("transB", 0) else b
    y = n.attr("alpha", 1.0) * (a @ b)
    return y if c is None else y + n.attr("beta", 1.0) * c


@OPS.executor("MatMul")
def _matmul(n: Node, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@OPS.executor("BatchNormalization")
def _batch_norm(n: Node, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    if n.attr("training_mode", 0):
        raise UnsupportedModelError(f"BatchNormalization node {n.name!r}: training_mode=1 is not supported "
                                    "for fine-tuning")
    # inference form: the running statistics stay fixed while scale and bias train
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, n.attr("epsilon", 1e-5))


@OPS.executor("InstanceNormalization")
def _instance_norm(n: Node, x: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


# -------------------------------------------------------------------------------- pooling
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(n: Node, x: Tensor):
    k = n.attr("kernel_shape")
    nd = len(k)
    strides, dilations = n.attr("strides", [1] * nd), n.attr("dilations", [1] * nd)
    pads = _spatial_pads(n, x.shape[2:], k, strides, dilations)
    ceil = bool(n.attr("ceil_mode", 0))
    out = []
    for size, kk, s, d, (pb, pe) in zip(x.shape[2:], k, strides, dilations, pads):
        span = size + pb + pe - ((kk - 1) * d + 1)
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= size + pb:  # no window may start inside the end padding
            o -= 1
        out.append(o)
    return k, strides, dilations, pads, ceil, out


def _crop(y: Tensor, sizes: Sequence[int]) -> Tensor:
    # pooling explicitly padded input with ceil_mode can yield one window more than ONNX allows
    return y[(..., *(slice(0, s) for s in sizes))]


@OPS.executor("MaxPool")
def _max_pool(n: Node, x: Tensor) -> Tensor:
    k, strides, dilations, pads, ceil, out = _pool_geometry(n, x)
    y = _MAX_POOL[len(k)](_pad_spatial(x, pads, -math.inf), k, strides, 0, dilations, ceil)
    return _crop(y, out)


def _undilated_geometry(n: Node, x: Tensor) -> tuple:
    """:func:`_pool_geometry` of a pool torch can only run undilated (its averaging pools)."""
    k, strides, dilations, pads, ceil, out = _pool_geometry(n, x)
    if any(d != 1 for d in dilations):
        raise UnsupportedModelError(f"{n.op} node {n.name!r}: dilations are not supported for fine-tuning")
    return k, strides, pads, ceil, out


@OPS.executor("AveragePool")
def _avg_pool(n: Node, x: Tensor) -> Tensor:
    k, strides, pads, ceil, out = _undilated_geometry(n, x)

    def pool(t: Tensor) -> Tensor:
        return _AVG_POOL[len(k)](_pad_spatial(t, pads), k, strides, 0, ceil)

    y = pool(x)
    if not n.attr("count_include_pad", 0) and any(b or e for b, e in pads):
        y = y / pool(torch.ones_like(x[:1, :1]))  # divide by the real (non-pad) elements per window
    return _crop(y, out)


@OPS.executor("LpPool")
def _lp_pool(n: Node, x: Tensor) -> Tensor:
    k, strides, pads, ceil, out = _undilated_geometry(n, x)
    p = n.attr("p", 2)
    y = _AVG_POOL[len(k)](_pad_spatial(x.abs() ** p, pads), k, strides, 0, ceil) * math.prod(k)
    return _crop(y ** (1.0 / p), out)


@OPS.executor("GlobalLpPool")
def _global_lp_pool(n: Node, x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, ord=n.attr("p", 2), dim=tuple(range(2, x.ndim)), keepdim=True)


@OPS.executor("GlobalAveragePool")
def _global_avg_pool(n: Node, x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


@OPS.executor("GlobalMaxPool")
def _global_max_pool(n: Node, x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


def _reduce(fn: Callable[..., Tensor]) -> Handler:
    def run(n: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = _ints(axes) if axes is not None else n.attr("axes")  # input since opset 13/18
        if not dims:
            if n.attr("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.ndim))
        return fn(x, dim=dims, keepdim=bool(n.attr("keepdims", 1)))
    return run


def _prod(x: Tensor, dim: list[int], keepdim: bool) -> Tensor:
    for d in sorted((d % x.ndim for d in dim), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


_register({op: _reduce(fn) for op, fn in {
    "ReduceMean": torch.mean, "ReduceMax": torch.amax, "ReduceMin": torch.amin, "ReduceSum": torch.sum,
    "ReduceProd": _prod,
    "ReduceL1": lambda x, dim, keepdim: x.abs().sum(dim=dim, keepdim=keepdim),
    "ReduceL2": lambda x, dim, keepdim: torch.sqrt((x * x).sum(dim=dim, keepdim=keepdim)),
    "ReduceSumSquare": lambda x, dim, keepdim: (x * x).sum(dim=dim, keepdim=keepdim),
    "ReduceLogSum": lambda x, dim, keepdim: torch.log(x.sum(dim=dim, keepdim=keepdim)),
    "ReduceLogSumExp": torch.logsumexp,
}.items()})


# ------------------------------------------------------------------------------- resizing
_HALF = np.float32(0.5)

# Input coordinate of each output index o (float32, as onnxruntime computes it), per
# coordinate_transformation_mode; arguments: o, output size, input size, scale.
_COORDS: dict[str, Callable[[np.ndarray, int, int, np.float32], np.ndarray]] = {
    "half_pixel": lambda o, out, size, s: (o + _HALF) / s - _HALF,
    "pytorch_half_pixel": lambda o, out, size, s: (o + _HALF) / s - _HALF if out > 1 else 0 * o,
    "align_corners": lambda o, out, size, s: o * np.float32(size - 1) / np.float32(out - 1) if out > 1 else 0 * o,
    "asymmetric": lambda o, out, size, s: o / s,
    "tf_half_pixel_for_nn": lambda o, out, size, s: (o + _HALF) / s,
}


_NEAREST: dict[str, Callable[[np.ndarray, bool], np.ndarray]] = {
    "round_prefer_floor": lambda c, down: np.where(c == np.floor(c) + 0.5, np.floor(c), np.round(c)),
    "round_prefer_ceil": lambda c, down: np.where(c == np.floor(c) + 0.5, np.ceil(c), np.round(c)),
    "floor": lambda c, down: np.floor(c),
    "ceil": lambda c, down: np.ceil(c),
    # Upsample and Resize-10 have no nearest_mode: onnxruntime truncates when enlarging, rounds up when shrinking
    "simple": lambda c, down: np.ceil(c) if down else np.trunc(c),
}


def _resize_axis(x: Tensor, axis: int, out: int, scale: np.float32, mode: str, coord: str,
                 nearest: str) -> Tensor:
    size = x.shape[axis]
    if out == size and scale == 1:  # onnxruntime leaves unscaled dims alone whatever the coordinate mode
        return x
    c = _COORDS[coord](np.arange(out, dtype=np.float32), out, size, scale)
    if mode == "nearest":
        idx = np.clip(_NEAREST[nearest](c, scale < 1), 0, size - 1).astype(np.int64)
        return x.index_select(axis, torch.as_tensor(idx, device=x.device))
    c = np.clip(c, 0, size - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = out
    w1 = torch.as_tensor(c - i0, dtype=x.dtype, device=x.device).reshape(shape)
    lo = x.index_select(axis, torch.as_tensor(i0, device=x.device))
    hi = x.index_select(axis, torch.as_tensor(i1, device=x.device))
    return lo * (1 - w1) + hi * w1


@OPS.executor("Resize", "Upsample")
def _resize(n: Node, x: Tensor, *args: Tensor | None) -> Tensor:
    mode = {"bilinear": "linear"}.get(n.attr("mode", "nearest"), n.attr("mode", "nearest"))
    coord = n.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear") or coord not in _COORDS:
        raise UnsupportedModelError(f"{n.op} node {n.name!r}: mode {mode!r} / coordinate_transformation_mode "
                                    f"{coord!r} is not supported for fine-tuning")
    if n.attr("antialias", 0) or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedModelError(f"{n.op} node {n.name!r}: antialias / keep_aspect_ratio_policy "
                                    "are not supported for fine-tuning")
    if n.op == "Upsample" or n.opset < 11:  # (X, scales) or Upsample-7's scales attribute
        scales, sizes = (args[0] if args else None), None
        coord, nearest = "asymmetric", "simple"
    else:  # (X, roi, scales, sizes)
        scales, sizes = (list(args[1:]) + [None, None])[:2]
        nearest = n.attr("nearest_mode", "round_prefer_floor")
    axes = [a % x.ndim for a in n.attr("axes", range(x.ndim))]
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        outs = _ints(sizes)
        factors = [np.float32(o) / np.float32(i) for o, i in zip(outs, in_sizes)]
    else:
        given = scales.reshape(-1).tolist() if scales is not None else n.attr("scales")
        factors = [np.float32(f) for f in given]
        outs = [int(np.floor(f * np.float32(i))) for f, i in zip(factors, in_sizes)]
    for a, o, f in zip(axes, outs, factors):
        x = _resize_axis(x, a, o, f, mode, coord, nearest)
    return x


# ---------------------------------------------------------------------------- shape plumbing
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@OPS.executor("Pad")
def _pad(n: Node, x: Tensor, pads: Tensor | None = None, value: Tensor | None = None,
         axes: Tensor | None = None) -> Tensor:
    if n.opset < 11:
        p, fill = n.attr("pads"), n.attr("value", 0.0)
    else:
        p, fill = _ints(pads), (0.0 if value is None else value.item())
    dims = [a % x.ndim for a in _ints(axes)] if axes is not None else list(range(x.ndim))
    per_dim = [(0, 0)] * x.ndim
    for i, a in enumerate(dims):
        per_dim[a] = (p[i], p[i + len(dims)])
    while per_dim and per_dim[0] == (0, 0):  # torch pads trailing dims only: drop untouched leading ones
        per_dim.pop(0)
    mode = n.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise UnsupportedModelError(f"Pad node {n.name!r}: mode {mode!r} is not supported for fine-tuning")
    if mode == "constant":
        return _pad_spatial(x, per_dim, fill)
    if len(per_dim) > min(3, x.ndim - 1):
        raise UnsupportedModelError(f"Pad node {n.name!r}: {mode} padding of leading dims is not "
                                    "supported for fine-tuning")
    x = _pad_spatial(x, [(min(b, 0), min(e, 0)) for b, e in per_dim])  # negative pads crop first
    return F.pad(x, [v for b, e in reversed(per_dim) for v in (max(b, 0), max(e, 0))], mode=_PAD_MODES[mode])


@OPS.executor("Concat")
def _concat(n: Node, *xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=n.attr("axis"))


@OPS.executor("Split")
def _split(n: Node, x: Tensor, sizes: Tensor | None = None) -> Sequence[Tensor]:
    axis = n.attr("axis", 0)
    split = _ints(sizes) if sizes is not None else n.attr("split")
    if not split:  # equal parts; with num_outputs (opset 18) the last one may be smaller
        parts = n.attr("num_outputs", len(n.outputs))
        split = -(-x.shape[axis] // parts)
    return torch.split(x, split, dim=axis)


def _slice_bounds(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    start = start + size if start < 0 else start
    end = end + size if end < 0 else end
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, 0), size - 1), min(max(end, -1), size - 1)


@OPS.executor("Slice")
def _slice(n: Node, x: Tensor, starts: Tensor | None = None, ends: Tensor | None = None,
           axes: Tensor | None = None, steps: Tensor | None = None) -> Tensor:
    if n.opset < 10:  # starts/ends/axes were attributes, no steps
        s0, e0, ax, st = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        s0, e0, ax, st = _ints(starts), _ints(ends), _opt_ints(axes), _opt_ints(steps)
    ax = ax if ax is not None else list(range(len(s0)))
    st = st if st is not None else [1] * len(s0)
    for a, start, end, step in zip(ax, s0, e0, st):
        a %= x.ndim
        start, end = _slice_bounds(start, end, step, x.shape[a])
        if step > 0:
            x = x[(slice(None),) * a + (slice(start, end, step),)]
        else:  # torch indexing has no negative steps
            x = x.index_select(a, torch.arange(start, end, step, device=x.device))
    return x


@OPS.executor("Transpose")
def _transpose(n: Node, x: Tensor) -> Tensor:
    return x.permute(n.attr("perm", list(range(x.ndim))[::-1]))


@OPS.executor("Flatten")
def _flatten(n: Node, x: Tensor) -> Tensor:
    a = n.attr("axis", 1)
    a = a + x.ndim if a < 0 else a
    return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))


@OPS.executor("Reshape")
def _reshape(n: Node, x: Tensor, shape: Tensor) -> Tensor:
    dims = _ints(shape)
    if not n.attr("allowzero", 0):  # 0 copies the input dim
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@OPS.executor("Squeeze")
def _squeeze(n: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _ints(axes) if axes is not None else n.attr("axes")
    return x.squeeze() if dims is None else x.squeeze(tuple(a % x.ndim for a in dims))


@OPS.executor("Unsqueeze")
def _unsqueeze(n: Node, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = _ints(axes) if axes is not None else n.attr("axes")
    rank = x.ndim + len(dims)
    for a in sorted(a % rank for a in dims):
        x = x.unsqueeze(a)
    return x


@OPS.executor("Shape")
def _shape(n: Node, x: Tensor) -> Tensor:
    dims = list(x.shape)[n.attr("start", 0):n.attr("end")]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@OPS.executor("Gather")
def _gather(n: Node, data: Tensor, idx: Tensor) -> Tensor:
    axis = n.attr("axis", 0) % data.ndim
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])


@OPS.executor("Cast")
def _cast(n: Node, x: Tensor) -> Tensor:
    return x.to(_dtype(n.attr("to"), n))


@OPS.executor("Dropout")
def _dropout(n: Node, x: Tensor, *_: Tensor | None) -> Sequence[Tensor]:
    # the exported graph is for inference: Dropout stays the identity while fine-tuning too
    return x, torch.ones_like(x, dtype=torch.bool)


_CONSTANT_ATTRS: dict[str, Callable[[Any], Tensor]] = {
    "value": _from_proto,
    "value_float": lambda v: torch.tensor(v, dtype=torch.float32),
    "value_floats": lambda v: torch.tensor(v, dtype=torch.float32),
    "value_int": lambda v: torch.tensor(v, dtype=torch.int64),
    "value_ints": lambda v: torch.tensor(v, dtype=torch.int64),
}


@OPS.executor("Constant")
def _constant(n: Node) -> Tensor:
    (key, value), = n.attrs.items()
    if key not in _CONSTANT_ATTRS:
        raise UnsupportedModelError(f"Constant node {n.name!r}: {key} is not supported for fine-tuning")
    return _CONSTANT_ATTRS[key](value)


@OPS.executor("ConstantOfShape")
def _constant_of_shape(n: Node, shape: Tensor) -> Tensor:
    value = n.attr("value")
    fill = _from_proto(value) if value is not None else torch.zeros(1)
    return torch.full(_ints(shape), fill.item(), dtype=fill.dtype, device=shape.device)


@OPS.executor("Expand")
def _expand(n: Node, x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))  # bidirectional broadcast


@OPS.executor("Range")
def _range(n: Node, start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@OPS.executor("Tile")
def _tile(n: Node, x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(_ints(repeats))


@OPS.executor("SpaceToDepth")
def _space_to_depth(n: Node, x: Tensor) -> Tensor:
    b = n.attr("blocksize")
    N, C, H, W = x.shape
    y = x.reshape(N, C, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(N, C * b * b, H // b, W // b)


@OPS.executor("DepthToSpace")
def _depth_to_space(n: Node, x: Tensor) -> Tensor:
    b = n.attr("blocksize")
    N, C, H, W = x.shape
    if n.attr("mode", "DCR") == "DCR":
        y = x.reshape(N, b, b, C // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD
        y = x.reshape(N, C // (b * b), b, b, H, W).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(N, C // (b * b), H * b, W * b)


# ================================================================================== module
def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")


def check_supported(nodes: Iterable[onnx.NodeProto]) -> None:
    """One line naming every op of ``nodes`` that :class:`OnnxModule` cannot run (and why, where
    the registry says), before anything is built from them."""
    bad = OPS.missing("executor", nodes)
    if bad:
        names = [s.name + (f" ({s.not_trainable})" if s.not_trainable else "") for s in bad]
        raise UnsupportedModelError(f"fine-tuning does not support ONNX op(s) {', '.join(names)}")


def _per_channel(shape: Sequence[int]) -> bool:
    """A vector along one axis ((C,), (C,1,1), (1,C,1,1)): a learned scale/shift, not a grid or scalar."""
    return sum(d > 1 for d in shape) == 1


def _trainable(graph: onnx.GraphProto, values: Mapping[str, Tensor], writable: set[str]) -> set[str]:
    dtypes = {t.name: t.data_type for t in graph.initializer}
    dtypes.update({n.output[0]: a.t.data_type for n in graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    names = set()
    for node in graph.node:
        spec = OPS.of(node)
        for pos in spec.weights:
            name = node.input[pos] if pos < len(node.input) else ""
            if (name in writable and dtypes[name] in _TRAINABLE_DTYPES
                    and (not spec.per_channel_weights or _per_channel(values[name].shape))):
                names.add(name)
    return names


def _safe_name(name: str, module: torch.nn.Module) -> str:
    """An attribute name for an ONNX tensor name ('.', '/', ':' are not allowed in nn.Module names)."""
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    base = "t_" + base if base[0].isdigit() else base
    cand, k = base, 1
    while hasattr(module, cand):  # also avoids shadowing nn.Module's own attributes
        cand, k = f"{base}_{k}", k + 1
    return cand


class OnnxModule(torch.nn.Module):
    """An ONNX graph executed node by node in torch, with its weights as trainable parameters.

    ``forward`` takes the graph inputs positionally (graph order) or as one ``{name: tensor}``
    dict and returns a tuple of the graph outputs in graph order. :meth:`run` returns any
    named tensors of the graph (e.g. the logits before a final Softmax).
    ``torch_names`` maps ONNX tensor names to attribute names and ``onnx_names`` back.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        opset = _default_opset(model)
        check_supported(graph.node)
        values = {t.name: _from_proto(t) for t in graph.initializer}
        writable = set(values)
        for proto in graph.node:
            if proto.op_type == "Constant":  # folded once here; never re-run in forward
                values[proto.output[0]] = _constant(_node(proto, opset))
                if any(a.name == "value" for a in proto.attribute):
                    writable.add(proto.output[0])
        trainable = _trainable(graph, values, writable)
        self.torch_names: dict[str, str] = {}
        for name, t in values.items():
            safe = _safe_name(name, self)
            if name in trainable:
                self.register_parameter(safe, torch.nn.Parameter(t))
            else:
                self.register_buffer(safe, t)
            self.torch_names[name] = safe
        self.onnx_names = {v: k for k, v in self.torch_names.items()}
        self.input_names = [i.name for i in graph.input if i.name not in values]
        self.output_names = [o.name for o in graph.output]
        self._nodes = [_node(p, opset) for p in graph.node if p.op_type != "Constant"]
        self._produced = {o for n in self._nodes for o in n.outputs if o}
        # modules applied to a tensor as it is produced (e.g. BatchNorm re-inserted for training)
        self.after = torch.nn.ModuleDict()
        self._after: dict[str, str] = {}
        self._plans: dict[tuple[tuple[str, ...], frozenset[str]], list[tuple[Node, list[str]]]] = {}

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors keyed by their ONNX names."""
        return {self.onnx_names[k]: p for k, p in self.named_parameters() if k in self.onnx_names}

    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def channels_last(self) -> OnnxModule:
        """This module with its 4-D weights (2-D convolutions') stored channels-last, in place:
        oneDNN and cuDNN then train such convolutions without reordering weights and gradients at
        every step. Values, and the weights exported, do not change."""
        with torch.no_grad():
            for t in [*self.parameters(), *self.buffers()]:
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
        return self

    def applied_after(self, tensor: str) -> torch.nn.Module | None:
        key = self._after.get(tensor)
        return self.after[key] if key is not None else None

    def apply_after(self, tensor: str, module: torch.nn.Module | None) -> None:
        """Apply ``module`` to ``tensor`` wherever it is produced (None removes it)."""
        key = self._after.pop(tensor, None) or _safe_name(tensor, self.after)
        if key in self.after:
            del self.after[key]
        if module is not None:
            self.after[key] = module
            self._after[tensor] = key

    def _plan(self, names: tuple[str, ...], given: frozenset[str] = frozenset()
              ) -> list[tuple[Node, list[str]]]:
        """The nodes needed for ``names`` from the graph inputs or the ``given`` tensors, each
        with the values that die after it (saves memory)."""
        key = (names, given)
        if key not in self._plans:
            unknown = [n for n in names if n not in self._produced and n not in self.torch_names
                       and n not in self.input_names]
            if unknown:
                raise ValueError(f"not tensors of this graph: {unknown}")
            needed, steps = set(names) - given, []
            for node in reversed(self._nodes):
                if needed.intersection(node.outputs):
                    steps.append(node)
                    needed.update(i for i in node.inputs if i and i not in given)
            steps.reverse()
            last = {i: k for k, node in enumerate(steps) for i in node.inputs if i}
            self._plans[key] = [(node, [i for i in set(node.inputs) if i and last[i] == k and i not in names])
                                for k, node in enumerate(steps)]
        return self._plans[key]

    def parameters_for(self, names: Sequence[str], given: Sequence[str] = ()) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors (by ONNX name) that computing ``names`` from ``given`` reads."""
        params = self.onnx_parameters()
        used = {i for node, _ in self._plan(tuple(names), frozenset(given)) for i in node.inputs}
        return {k: p for k, p in params.items() if k in used}

    def run(self, feeds: Mapping[str, Tensor], names: Sequence[str]) -> list[Tensor]:
        """Compute the named tensors from ``{tensor name: tensor}``: the graph inputs, or any
        tensors of the graph that the computation should start from."""
        given = frozenset(feeds)
        plan = self._plan(tuple(names), given)
        missing = sorted({i for node, _ in plan for i in node.inputs
                          if i in self.input_names and i not in given})
        if missing:
            raise ValueError(f"missing graph inputs {missing}")
        env: dict[str, Tensor] = {name: getattr(self, safe) for name, safe in self.torch_names.items()}
        env.update(feeds)
        for node, dead in plan:
            result = OPS.get(node.op).executor(node, *(env[i] if i else None for i in node.inputs))
            results = [result] if isinstance(result, Tensor) else list(result)
            for k, out in enumerate(node.outputs):
                if not out:
                    continue
                if k >= len(results):  # e.g. MaxPool's Indices
                    raise UnsupportedModelError(f"{node.op} node {node.name!r}: output #{k} ({out!r}) "
                                                "is not supported for fine-tuning")
                env[out] = results[k] if out not in self._after else self.after[self._after[out]](results[k])
            for d in dead:
                del env[d]
        return [env[n] for n in names]

    def forward(self, *inputs: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, ...]:
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            feeds = dict(inputs[0])
        elif len(inputs) == len(self.input_names):
            feeds = dict(zip(self.input_names, inputs))
        else:
            raise ValueError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        return tuple(self.run(feeds, self.output_names))


def _write_tensor(t: onnx.TensorProto, arr: np.ndarray) -> None:
    """Replace the data of ``t`` in place, keeping its name, type, dims and doc string."""
    if tuple(arr.shape) != tuple(t.dims):
        raise ValueError(f"tensor {t.name!r}: trained shape {arr.shape} differs from {tuple(t.dims)}")
    new = numpy_helper.from_array(arr.astype(helper.tensor_dtype_to_np_dtype(t.data_type)), t.name)
    for field in ("float_data", "double_data", "int32_data", "int64_data", "external_data"):
        t.ClearField(field)
    t.data_location = TensorProto.DEFAULT
    t.raw_data = new.raw_data


def export_weights(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with ``module``'s trained parameters written into the same tensors."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = {t.name: t for t in out.graph.initializer}
    targets.update({n.output[0]: a.t for n in out.graph.node if n.op_type == "Constant"
                    for a in n.attribute if a.name == "value"})
    for name, p in module.onnx_parameters().items():
        if name not in targets:
            raise ValueError(f"parameter {name!r} is not a tensor of this model (module built from another one?)")
        _write_tensor(targets[name], np.ascontiguousarray(p.detach().cpu().numpy()))
    return out
