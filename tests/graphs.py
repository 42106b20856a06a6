"""Small hand-built ONNX CNNs for onnxcc tests (no dependency on onnxcc).

Every builder is ``def <name>(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto``
and is registered in :data:`GRAPHS`. The opsets each builder was verified at
are in :data:`OPSETS_TO_TRY`; :func:`cases` flattens that into
``(name, opset)`` pairs for ``pytest.mark.parametrize``.

All graphs take a float32 input named ``"x"`` of shape ``(1, C, H, W)``
(``transpose_nhwc`` takes ``(1, H, W, C)``), use small sizes so they run in
milliseconds, and carry random float32 weights from
``np.random.default_rng(seed)``. Opset-dependent spellings (Clip min/max,
Split sizes, ReduceMean axes, Pad pads, Slice, Resize/Upsample, HardSwish)
are handled by :class:`GraphBuilder`, which ``tests/strategies.py`` reuses.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "GraphBuilder",
    "ACTIVATIONS",
    "GRAPHS",
    "OPSETS_TO_TRY",
    "ALL_OPSETS",
    "cases",
    "tiny_resnet",
    "tiny_mobilenet",
]

ALL_OPSETS: tuple[int, ...] = (9, 11, 13, 18, 21)

ACTIVATIONS: tuple[str, ...] = (
    "relu", "clip", "leaky_relu", "prelu", "sigmoid", "hard_sigmoid",
    "hard_swish", "tanh", "gelu", "silu",
)


def _conv_out(size: int, k: int, s: int, p0: int, p1: int, d: int = 1) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


class GraphBuilder:
    """Tiny ONNX graph builder that tracks static shapes of every tensor.

    Methods take and return tensor names. ``self.shapes[name]`` holds the
    static shape, which is used to size weights and is declared on graph
    outputs (so the full checker cross-checks the bookkeeping).
    """

    def __init__(self, opset: int = 13, seed: int = 0, name: str = "graph"):
        self.opset = int(opset)
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._count: dict[str, int] = {}

    # ---------------------------------------------------------------- basics
    def fresh(self, prefix: str) -> str:
        i = self._count.get(prefix, 0)
        self._count[prefix] = i + 1
        return f"{prefix}_{i}"

    def input(self, shape: Sequence[int], name: str = "x") -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def init(self, arr: np.ndarray, prefix: str = "const") -> str:
        name = self.fresh(prefix)
        arr = np.asarray(arr)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.shapes[name] = tuple(arr.shape)
        return name

    def const_node(self, arr: np.ndarray, prefix: str = "cst") -> str:
        """A ``Constant`` node (instead of an initializer)."""
        arr = np.asarray(arr)
        out = self.fresh(prefix)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant"),
                                           value=numpy_helper.from_array(arr, out + "_value")))
        self.shapes[out] = tuple(arr.shape)
        return out

    def f32(self, values, prefix: str = "c", as_node: bool = False) -> str:
        arr = np.asarray(values, dtype=np.float32)
        return self.const_node(arr, prefix) if as_node else self.init(arr, prefix)

    def i64(self, values, prefix: str = "i") -> str:
        return self.init(np.asarray(values, dtype=np.int64), prefix)

    def node(self, op: str, inputs: Sequence[str], shapes, **attrs):
        """Add a node. ``shapes`` is one output shape or a list of them."""
        multi = isinstance(shapes, list)
        shapes_l = shapes if multi else [shapes]
        outs = [self.fresh(op.lower()) for _ in shapes_l]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh(op), **attrs))
        for o, s in zip(outs, shapes_l):
            self.shapes[o] = tuple(int(d) for d in s)
        return outs if multi else outs[0]

    def weight(self, shape: Sequence[int], fan_in: int) -> np.ndarray:
        std = math.sqrt(2.0 / max(1, fan_in))
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def ch(self, x: str) -> int:
        return self.shapes[x][1]

    # ------------------------------------------------------------ layers
    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, pad=None, group: int = 1,
             bias: bool = True, dilation: int = 1, weight_as_node: bool = False, weight: str | None = None) -> str:
        """Conv. ``pad`` is None (same-ish: k//2), an int, or 4 pads (t, l, b, r); ``weight``
        names an existing initializer to read (shared with another Conv)."""
        n, cin, h, w = self.shapes[x]
        assert cin % group == 0 and cout % group == 0, (cin, cout, group)
        if pad is None:
            pad = (k // 2) * dilation
        pads = [pad] * 4 if isinstance(pad, int) else list(pad)
        if weight is not None:
            wname = weight
        else:
            W = self.weight((cout, cin // group, k, k), fan_in=cin // group * k * k)
            wname = self.const_node(W, "W") if weight_as_node else self.init(W, "W")
        ins = [x, wname]
        if bias:
            ins.append(self.init((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "B"))
        ho = _conv_out(h, k, stride, pads[0], pads[2], dilation)
        wo = _conv_out(w, k, stride, pads[1], pads[3], dilation)
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=pads)
        if group != 1:
            attrs["group"] = group
        if dilation != 1:
            attrs["dilations"] = [dilation, dilation]
        return self.node("Conv", ins, (n, cout, ho, wo), **attrs)

    def conv_transpose(self, x: str, cout: int, k: int = 3, stride: int = 2, pad: int = 1,
                       output_padding: int = 1, bias: bool = True) -> str:
        n, cin, h, w = self.shapes[x]
        W = self.weight((cin, cout, k, k), fan_in=cin * k * k // (stride * stride))
        ins = [x, self.init(W, "Wt")]
        if bias:
            ins.append(self.init((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "Bt"))
        ho = stride * (h - 1) + output_padding + k - 2 * pad
        wo = stride * (w - 1) + output_padding + k - 2 * pad
        return self.node("ConvTranspose", ins, (n, cout, ho, wo), kernel_shape=[k, k],
                         strides=[stride, stride], pads=[pad] * 4,
                         output_padding=[output_padding, output_padding])

    def bn(self, x: str, eps: float = 1e-5) -> str:
        c = self.ch(x)
        r = self.rng
        scale = self.init(r.uniform(0.5, 1.5, c).astype(np.float32) * r.choice([-1, 1], c).astype(np.float32), "bn_scale")
        bias = self.init(r.normal(0, 0.3, c).astype(np.float32), "bn_bias")
        mean = self.init(r.normal(0, 0.3, c).astype(np.float32), "bn_mean")
        var = self.init(r.uniform(0.3, 2.0, c).astype(np.float32), "bn_var")
        return self.node("BatchNormalization", [x, scale, bias, mean, var], self.shapes[x], epsilon=eps)

    def instance_norm(self, x: str) -> str:
        c = self.ch(x)
        scale = self.init(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "in_scale")
        bias = self.init(self.rng.normal(0, 0.3, c).astype(np.float32), "in_bias")
        return self.node("InstanceNormalization", [x, scale, bias], self.shapes[x], epsilon=1e-5)

    # activations -------------------------------------------------------
    def relu(self, x: str) -> str:
        return self.node("Relu", [x], self.shapes[x])

    def clip(self, x: str, lo: float | None = 0.0, hi: float | None = 6.0) -> str:
        if self.opset < 11:
            attrs = {}
            if lo is not None:
                attrs["min"] = float(lo)
            if hi is not None:
                attrs["max"] = float(hi)
            return self.node("Clip", [x], self.shapes[x], **attrs)
        ins = [x, self.f32(lo, "clip_min") if lo is not None else ""]
        if hi is not None:
            ins.append(self.f32(hi, "clip_max"))
        return self.node("Clip", ins, self.shapes[x])

    def leaky_relu(self, x: str, alpha: float = 0.1) -> str:
        return self.node("LeakyRelu", [x], self.shapes[x], alpha=alpha)

    def prelu(self, x: str) -> str:
        c = self.ch(x)
        slope = self.init(self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32), "prelu_slope")
        return self.node("PRelu", [x, slope], self.shapes[x])

    def sigmoid(self, x: str) -> str:
        return self.node("Sigmoid", [x], self.shapes[x])

    def hard_sigmoid(self, x: str, alpha: float = 0.2, beta: float = 0.5) -> str:
        return self.node("HardSigmoid", [x], self.shapes[x], alpha=alpha, beta=beta)

    def hard_swish(self, x: str) -> str:
        """HardSwish op at opset >= 14, else the exporter pattern x * HardSigmoid(x, 1/6, 0.5)."""
        if self.opset >= 14:
            return self.node("HardSwish", [x], self.shapes[x])
        return self.mul(x, self.hard_sigmoid(x, alpha=1.0 / 6.0, beta=0.5))

    def tanh(self, x: str) -> str:
        return self.node("Tanh", [x], self.shapes[x])

    def gelu(self, x: str) -> str:
        """Erf GELU as exported by torch: x * 0.5 * (1 + Erf(x / sqrt(2)))."""
        d = self.div(x, self.f32(math.sqrt(2.0), "sqrt2"))
        e = self.node("Erf", [d], self.shapes[d])
        a = self.add(e, self.f32(1.0, "one"))
        m = self.mul(x, a)
        return self.mul(m, self.f32(0.5, "half"))

    def silu(self, x: str) -> str:
        return self.mul(x, self.sigmoid(x))

    def act(self, x: str, kind: str) -> str:
        return getattr(self, kind)(x)

    # element-wise ---------------------------------------------------------
    def _binary(self, op: str, a: str, b: str) -> str:
        shape = np.broadcast_shapes(self.shapes[a], self.shapes[b])
        return self.node(op, [a, b], shape)

    def add(self, a: str, b: str) -> str:
        return self._binary("Add", a, b)

    def sub(self, a: str, b: str) -> str:
        return self._binary("Sub", a, b)

    def mul(self, a: str, b: str) -> str:
        return self._binary("Mul", a, b)

    def div(self, a: str, b: str) -> str:
        return self._binary("Div", a, b)

    # channel plumbing -------------------------------------------------------
    def concat(self, xs: Sequence[str], axis: int = 1) -> str:
        shape = list(self.shapes[xs[0]])
        shape[axis] = sum(self.shapes[t][axis] for t in xs)
        return self.node("Concat", list(xs), tuple(shape), axis=axis)

    def split(self, x: str, sizes: Sequence[int] | None = None, num_outputs: int | None = None,
              axis: int = 1) -> list[str]:
        """Split on ``axis``.

        opset < 13: ``split`` attribute; 13..17: ``split`` input; >= 18:
        ``split`` input if ``sizes`` given, else ``num_outputs`` attribute
        (last chunk smaller when not divisible).
        """
        shape = list(self.shapes[x])
        dim = shape[axis]
        if sizes is None:
            assert num_outputs is not None
            chunk = -(-dim // num_outputs)
            sizes = [chunk] * (num_outputs - 1) + [dim - chunk * (num_outputs - 1)]
            if sizes[-1] <= 0:
                raise ValueError(f"Split num_outputs={num_outputs} on {dim} leaves an empty last chunk")
            use_num_outputs = self.opset >= 18
        else:
            use_num_outputs = False
        assert sum(sizes) == dim and all(s > 0 for s in sizes), (sizes, dim)
        out_shapes = []
        for s in sizes:
            sh = list(shape)
            sh[axis] = s
            out_shapes.append(tuple(sh))
        if self.opset < 13:
            return self.node("Split", [x], out_shapes, axis=axis, split=list(sizes))
        if use_num_outputs:
            return self.node("Split", [x], out_shapes, axis=axis, num_outputs=len(sizes))
        return self.node("Split", [x, self.i64(sizes, "split")], out_shapes, axis=axis)

    def slice(self, x: str, start: int, end: int, axis: int = 1, step: int = 1) -> str:
        shape = list(self.shapes[x])
        shape[axis] = len(range(*slice(start, end, step).indices(shape[axis])))
        if self.opset < 10:
            assert step == 1
            return self.node("Slice", [x], tuple(shape), starts=[start], ends=[end], axes=[axis])
        ins = [x, self.i64([start], "starts"), self.i64([end], "ends"), self.i64([axis], "axes")]
        if step != 1:
            ins.append(self.i64([step], "steps"))
        return self.node("Slice", ins, tuple(shape))

    # pooling / resampling ------------------------------------------------------
    def _pool(self, op: str, x: str, k: int, stride: int, pad: int, **extra) -> str:
        n, c, h, w = self.shapes[x]
        shape = (n, c, _conv_out(h, k, stride, pad, pad), _conv_out(w, k, stride, pad, pad))
        return self.node(op, [x], shape, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[pad] * 4, **extra)

    def maxpool(self, x: str, k: int = 2, stride: int = 2, pad: int = 0) -> str:
        return self._pool("MaxPool", x, k, stride, pad)

    def avgpool(self, x: str, k: int = 2, stride: int = 2, pad: int = 0, count_include_pad: int = 0) -> str:
        extra = {"count_include_pad": count_include_pad} if count_include_pad else {}
        return self._pool("AveragePool", x, k, stride, pad, **extra)

    def gap(self, x: str) -> str:
        n, c = self.shapes[x][:2]
        return self.node("GlobalAveragePool", [x], (n, c, 1, 1))

    def gmp(self, x: str) -> str:
        n, c = self.shapes[x][:2]
        return self.node("GlobalMaxPool", [x], (n, c, 1, 1))

    def reduce_mean(self, x: str, axes: Sequence[int] = (2, 3), keepdims: int = 1) -> str:
        shape = list(self.shapes[x])
        for a in axes:
            shape[a] = 1
        if not keepdims:
            shape = [d for i, d in enumerate(shape) if i not in set(axes)]
        if self.opset < 18:
            return self.node("ReduceMean", [x], tuple(shape), axes=list(axes), keepdims=keepdims)
        return self.node("ReduceMean", [x, self.i64(list(axes), "axes")], tuple(shape), keepdims=keepdims)

    def upsample2x(self, x: str) -> str:
        """Nearest x2: Upsample (opset 9), Resize(X, scales) (10), Resize(X, roi, scales) (>= 11)."""
        n, c, h, w = self.shapes[x]
        out = (n, c, 2 * h, 2 * w)
        scales = self.f32([1.0, 1.0, 2.0, 2.0], "scales")
        if self.opset < 10:
            return self.node("Upsample", [x, scales], out, mode="nearest")
        if self.opset == 10:
            return self.node("Resize", [x, scales], out, mode="nearest")
        roi = self.f32(np.zeros(0, np.float32), "roi") if self.opset < 13 else ""
        return self.node("Resize", [x, roi, scales], out, mode="nearest")

    def pad(self, x: str, pads: Sequence[int], channels: tuple[int, int] = (0, 0)) -> str:
        """Constant-zero Pad; ``pads`` = (top, left, bottom, right) on H, W; ``channels`` =
        (before, after) on the channel axis (a ResNet shortcut widened with zeros)."""
        t, l, b, r = pads
        n, c, h, w = self.shapes[x]
        full = [0, channels[0], t, l, 0, channels[1], b, r]
        out = (n, c + sum(channels), h + t + b, w + l + r)
        if self.opset < 11:
            return self.node("Pad", [x], out, pads=full, mode="constant", value=0.0)
        return self.node("Pad", [x, self.i64(full, "pads"), self.f32(0.0, "pad_value")], out, mode="constant")

    # reshaping / heads ------------------------------------------------------------
    def flatten(self, x: str, axis: int = 1) -> str:
        s = self.shapes[x]
        return self.node("Flatten", [x], (int(np.prod(s[:axis])), int(np.prod(s[axis:]))), axis=axis)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        src = self.shapes[x]
        out = [src[i] if d == 0 else d for i, d in enumerate(shape)]
        if -1 in out:
            known = int(np.prod([d for d in out if d != -1]))
            out[out.index(-1)] = int(np.prod(src)) // known
        return self.node("Reshape", [x, self.i64(list(shape), "shape")], tuple(out))

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        s = self.shapes[x]
        return self.node("Transpose", [x], tuple(s[p] for p in perm), perm=list(perm))

    def gemm(self, x: str, nout: int, trans_b: int = 1, bias: bool = True) -> str:
        m, k = self.shapes[x]
        W = self.weight((nout, k) if trans_b else (k, nout), fan_in=k)
        ins = [x, self.init(W, "Wg")]
        if bias or self.opset < 11:  # C is required before Gemm-11
            ins.append(self.init((self.rng.standard_normal(nout) * 0.1).astype(np.float32), "Bg"))
        attrs = {"transB": 1} if trans_b else {}
        return self.node("Gemm", ins, (m, nout), **attrs)

    def matmul(self, x: str, nout: int) -> str:
        s = self.shapes[x]
        W = self.weight((s[-1], nout), fan_in=s[-1])
        return self.node("MatMul", [x, self.init(W, "Wm")], tuple(s[:-1]) + (nout,))

    def softmax(self, x: str, axis: int) -> str:
        return self.node("Softmax", [x], self.shapes[x], axis=axis)

    # -------------------------------------------------------------- output
    def build(self, outputs: Sequence[str] | str, name: str | None = None) -> onnx.ModelProto:
        if isinstance(outputs, str):
            outputs = [outputs]
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(self.shapes[o])) for o in outputs]
        graph = helper.make_graph(self.nodes, name or self.name, self.inputs, outs, initializer=self.inits)
        opset_imports = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opset_imports, producer_name="onnxcc-tests")
        model.ir_version = helper.find_min_ir_version_for(opset_imports)
        return model


# ============================================================================
# builders
# ============================================================================

GRAPHS: dict[str, Callable[..., onnx.ModelProto]] = {}
OPSETS_TO_TRY: dict[str, tuple[int, ...]] = {}


def _register(opsets: Sequence[int] = ALL_OPSETS):
    def deco(fn):
        GRAPHS[fn.__name__] = fn
        OPSETS_TO_TRY[fn.__name__] = tuple(opsets)
        return fn
    return deco


def cases() -> list[tuple[str, int]]:
    """``[(builder_name, opset), ...]`` for every supported combination."""
    return [(name, op) for name in GRAPHS for op in OPSETS_TO_TRY[name]]


@_register()
def conv_chain(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """x(1,3,12,12) -> Conv(3->8,k3,p1,bias) -> Relu -> Conv(8->6,k3,p1,no bias).

    MACs = 8*3*9*144 + 6*8*9*144 = 31104 + 62208 = 93312.
    """
    g = GraphBuilder(opset, seed, "conv_chain")
    x = g.input((1, 3, 12, 12))
    y = g.relu(g.conv(x, 8, 3, bias=True))
    y = g.conv(y, 6, 3, bias=False)
    return g.build(y)


@_register()
def conv_bn(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv(no bias)->BN->Relu->Conv(bias)->BN->Relu->Conv."""
    g = GraphBuilder(opset, seed, "conv_bn")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.bn(g.conv(x, 8, 3, bias=False)))
    y = g.relu(g.bn(g.conv(y, 12, 3, bias=True)))
    y = g.conv(y, 5, 1)
    return g.build(y)


@_register()
def bn_standalone(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """BN on the graph input, and BN after an Add of two convs (not directly after a conv)."""
    g = GraphBuilder(opset, seed, "bn_standalone")
    x = g.input((1, 4, 10, 10))
    xn = g.bn(x)
    a = g.conv(xn, 8, 3)
    b = g.conv(xn, 8, 1)
    y = g.relu(g.bn(g.add(a, b)))
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def grouped_conv(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv(4->8) -> Conv(8->12, group=2) -> Relu -> Conv(12->12, group=2) -> Relu -> Conv(12->6)."""
    g = GraphBuilder(opset, seed, "grouped_conv")
    x = g.input((1, 4, 10, 10))
    y = g.relu(g.conv(x, 8, 3))
    y = g.relu(g.conv(y, 12, 3, group=2))
    y = g.relu(g.conv(y, 12, 3, group=2, bias=False))
    y = g.conv(y, 6, 1)
    return g.build(y)


@_register()
def depthwise(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 inverted residual: 1x1 expand -> BN -> ReLU6 -> dw 3x3 -> BN -> ReLU6 -> 1x1 project -> BN (+ skip)."""
    g = GraphBuilder(opset, seed, "depthwise")
    x = g.input((1, 3, 12, 12))
    s = g.relu(g.bn(g.conv(x, 6, 3, bias=False)))
    y = g.clip(g.bn(g.conv(s, 16, 1, bias=False)))
    y = g.clip(g.bn(g.conv(y, 16, 3, group=16, bias=False)))
    y = g.bn(g.conv(y, 6, 1, bias=False))
    y = g.add(s, y)
    y = g.conv(y, 4, 1)
    return g.build(y)


@_register()
def depthwise_multiplier(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Depthwise conv with channel multiplier 2 (group=C_in, C_out=2*C_in), stride 2."""
    g = GraphBuilder(opset, seed, "depthwise_multiplier")
    x = g.input((1, 4, 12, 12))
    y = g.relu(g.conv(x, 6, 1))
    y = g.relu(g.conv(y, 12, 3, stride=2, group=6))
    y = g.conv(y, 5, 1)
    return g.build(y)


@_register()
def conv_transpose(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> ConvTranspose(8->6, k3 s2 p1 op1, group 1) -> Relu -> Conv."""
    g = GraphBuilder(opset, seed, "conv_transpose")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 8, 3))
    y = g.relu(g.conv_transpose(y, 6, k=3, stride=2, pad=1, output_padding=1))
    y = g.conv(y, 4, 3)
    return g.build(y)


@_register()
def instance_norm(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(opset, seed, "instance_norm")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.instance_norm(g.conv(x, 8, 3)))
    y = g.conv(y, 6, 3)
    return g.build(y)


def _activations(opset: int, seed: int, name: str) -> onnx.ModelProto:
    g = GraphBuilder(opset, seed, name)
    x = g.input((1, 3, 8, 8))
    y = g.conv(x, 6, 3)
    for i, kind in enumerate(ACTIVATIONS):
        y = g.act(y, kind)
        y = g.conv(y, 6 + (i % 3), 3 if i % 2 else 1)
    if opset >= 11:  # Clip with only a min input (max omitted)
        y = g.conv(g.clip(y, 0.0, None), 5, 1)
    else:
        y = g.conv(g.clip(y, -1.0, 1.0), 5, 1)
    return g.build(y)


@_register((9, 11, 13, 14, 18, 21))
def activations(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Every activation in :data:`ACTIVATIONS`, each between two convs.

    Clip uses inputs at opset >= 11 and attributes below; HardSwish is the
    op at opset >= 14 and x*HardSigmoid(x, 1/6, 0.5) below.
    """
    return _activations(opset, seed, "activations")


@_register()
def residual_add(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """ResNet basic blocks: one identity shortcut, one projection (1x1 s2 conv + BN) shortcut."""
    g = GraphBuilder(opset, seed, "residual_add")
    x = g.input((1, 3, 12, 12))
    s = g.relu(g.bn(g.conv(x, 8, 3, bias=False)))
    # identity block
    y = g.relu(g.bn(g.conv(s, 8, 3, bias=False)))
    y = g.bn(g.conv(y, 8, 3, bias=False))
    s = g.relu(g.add(y, s))
    # projection block
    y = g.relu(g.bn(g.conv(s, 12, 3, stride=2, bias=False)))
    y = g.bn(g.conv(y, 12, 3, bias=False))
    p = g.bn(g.conv(s, 12, 1, stride=2, bias=False))
    s = g.relu(g.add(p, y))
    y = g.conv(s, 4, 1)
    return g.build(y)


@_register()
def se_block(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> SE (GAP -> Conv -> Relu -> Conv -> Sigmoid -> Mul broadcast) -> Conv."""
    g = GraphBuilder(opset, seed, "se_block")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 12, 3))
    s = g.gap(y)
    s = g.relu(g.conv(s, 4, 1))
    s = g.sigmoid(g.conv(s, 12, 1))
    y = g.mul(y, s)
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def per_channel_consts(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Add/Sub/Mul/Div by per-channel (1,C,1,1) and (C,1,1) constants and by scalars (some as Constant nodes)."""
    g = GraphBuilder(opset, seed, "per_channel_consts")
    r = g.rng
    x = g.input((1, 3, 8, 8))
    y = g.conv(x, 8, 3)
    c = 8
    y = g.add(y, g.f32(r.normal(0, 0.5, (1, c, 1, 1)), "addc"))
    y = g.mul(g.f32(r.uniform(0.5, 2.0, (1, c, 1, 1)) * r.choice([-1, 1], (1, c, 1, 1)), "mulc", as_node=True), y)
    y = g.sub(y, g.f32(r.normal(0, 0.5, (c, 1, 1)), "subc"))
    y = g.div(y, g.f32(r.uniform(0.5, 2.0, (1, c, 1, 1)), "divc"))
    y = g.relu(y)
    y = g.conv(y, 6, 3)
    y = g.mul(y, g.f32(1.7, "muls"))
    y = g.add(y, g.f32(np.float32(0.3), "adds", as_node=True))
    y = g.sub(g.f32(0.1, "subs"), y)
    y = g.div(y, g.f32(2.5, "divs"))
    y = g.conv(y, 4, 1)
    return g.build(y)


@_register()
def concat(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Two conv branches (5 and 7 channels) concatenated on axis 1, then a conv."""
    g = GraphBuilder(opset, seed, "concat")
    x = g.input((1, 4, 10, 10))
    s = g.relu(g.conv(x, 6, 3))
    a = g.relu(g.conv(s, 5, 3))
    b = g.relu(g.conv(s, 7, 1))
    y = g.concat([a, b])
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def concat_with_identity(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Concat of an un-convolved tensor with a conv branch (DenseNet style)."""
    g = GraphBuilder(opset, seed, "concat_with_identity")
    x = g.input((1, 4, 10, 10))
    s = g.relu(g.conv(x, 6, 3))
    a = g.relu(g.conv(s, 5, 3))
    y = g.concat([s, a])
    y = g.relu(g.conv(y, 8, 1))
    y = g.concat([g.conv(y, 3, 3), y, s])
    y = g.conv(y, 4, 1)
    return g.build(y)


@_register()
def split(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Split on channels into unequal parts, branches processed, merged by Add and by Concat.

    First split: ``split`` attr (opset < 13), ``split`` input (13..17),
    ``num_outputs=2`` on 7 channels -> (4, 3) (opset >= 18).
    Second split: sizes (2, 5, 3) via attr (< 13) or input (>= 13).
    """
    g = GraphBuilder(opset, seed, "split")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 7, 3))
    if opset >= 18:
        a, b = g.split(y, num_outputs=2)
    else:
        a, b = g.split(y, [4, 3])
    a = g.relu(g.conv(a, 6, 3))
    b = g.relu(g.conv(b, 6, 1))
    y = g.add(a, b)
    y = g.relu(g.conv(y, 10, 3))
    p, q, r = g.split(y, [2, 5, 3])
    q = g.relu(g.conv(q, 4, 3))
    r = g.sigmoid(r)
    y = g.concat([q, p, r])
    y = g.conv(y, 4, 1)
    return g.build(y)


@_register()
def slice_channels(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Slice on axis 1 ([2:7] of 8 channels) feeding a conv, plus the full tensor to another conv."""
    g = GraphBuilder(opset, seed, "slice_channels")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 8, 3))
    s = g.slice(y, 2, 7, axis=1)
    a = g.conv(s, 6, 3)
    b = g.conv(y, 6, 1)
    y = g.add(a, b)
    y = g.conv(y, 4, 1)
    return g.build(y)


@_register()
def pooling(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """MaxPool k2s2, AveragePool k3s1p1, GlobalMaxPool, GlobalAveragePool between convs."""
    g = GraphBuilder(opset, seed, "pooling")
    x = g.input((1, 3, 16, 16))
    y = g.relu(g.conv(x, 8, 3))
    y = g.maxpool(y, 2, 2)
    y = g.relu(g.conv(y, 10, 3))
    y = g.avgpool(y, 3, 1, 1)
    y = g.relu(g.conv(y, 12, 3))
    m = g.gmp(y)
    a = g.gap(y)
    y = g.add(g.conv(m, 6, 1), g.conv(a, 6, 1))
    return g.build(y)


@_register()
def reduce_mean(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """ReduceMean over [2,3] keepdims=1 (attr < 18, input >= 18) used SE-style and as a head."""
    g = GraphBuilder(opset, seed, "reduce_mean")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 8, 3))
    s = g.sigmoid(g.conv(g.reduce_mean(y), 8, 1))
    y = g.mul(y, s)
    y = g.relu(g.conv(y, 6, 3))
    y = g.conv(g.reduce_mean(y), 4, 1)
    return g.build(y)


@_register()
def resize(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> nearest x2 (Resize with scales; Upsample at opset 9) -> Conv."""
    g = GraphBuilder(opset, seed, "resize")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 8, 3))
    y = g.upsample2x(y)
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def pad(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Zero Pad on spatial dims (pads input >= 11, attr at 9) before a pad-0 conv, one asymmetric."""
    g = GraphBuilder(opset, seed, "pad")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 8, 3))
    y = g.pad(y, (1, 1, 1, 1))
    y = g.relu(g.conv(y, 8, 3, pad=0))
    y = g.pad(y, (0, 1, 2, 0))
    y = g.conv(y, 5, 3, pad=0)
    return g.build(y)


@_register()
def channel_pad_residual(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """ResNet "option A" shortcuts: the narrower input is zero-padded on the channel axis
    (before and after) and added to the wider block output."""
    g = GraphBuilder(opset, seed, "channel_pad_residual")
    x = g.input((1, 3, 10, 10))
    s = g.relu(g.conv(x, 8, 3))
    y = g.conv(g.relu(g.conv(s, 12, 3)), 12, 3)
    s = g.relu(g.add(y, g.pad(s, (0, 0, 0, 0), channels=(0, 4))))
    y = g.conv(g.relu(g.conv(s, 16, 3)), 16, 3)
    s = g.relu(g.add(g.pad(s, (0, 0, 0, 0), channels=(2, 2)), y))
    return g.build(g.conv(s, 4, 1))


@_register()
def shared_weights(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """One weight read by three Convs: twice on two different tensors (a Siamese trunk), once
    dilated on the first (a filter bank); one reader has its own BatchNorm."""
    g = GraphBuilder(opset, seed, "shared_weights")
    x = g.input((1, 3, 12, 12))
    a, b = g.relu(g.conv(x, 8, 3)), g.relu(g.conv(x, 8, 3))
    w = g.init(g.weight((10, 8, 3, 3), 72), "W_shared")
    ya = g.relu(g.bn(g.conv(a, 10, 3, bias=False, weight=w)))   # folding it would copy the weight
    yb = g.relu(g.conv(b, 10, 3, bias=False, weight=w))
    yd = g.relu(g.conv(a, 10, 3, bias=False, weight=w, dilation=2))
    return g.build(g.conv(g.concat([ya, yb, yd]), 4, 1))


@_register()
def spectrogram(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """A Conv1D filter bank over frames, its filters turned into the frequency axis of a Conv2D
    (Transpose + Reshape), as keras audio nets export an STFT front end."""
    g = GraphBuilder(opset, seed, "spectrogram")
    x = g.input((1, 16, 20))
    bank = g.init(g.weight((12, 16, 1), 16), "W_bank")
    f = g.node("Conv", [x, bank], (1, 12, 20), kernel_shape=[1])
    f = g.node("Transpose", [g.node("Abs", [f], (1, 12, 20))], (1, 20, 12), perm=[0, 2, 1])
    y = g.node("Reshape", [f, g.i64([1, 1, 20, 12], "shape")], (1, 1, 20, 12))
    y = g.maxpool(g.relu(g.conv(y, 8, 3)))
    return g.build(g.conv(g.relu(g.conv(y, 8, 3)), 4, 1))


@_register()
def transpose_nhwc(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """NHWC input (1,8,8,3) -> Transpose -> convs -> Transpose back -> Reshape flatten -> MatMul -> Add."""
    g = GraphBuilder(opset, seed, "transpose_nhwc")
    x = g.input((1, 8, 8, 3))
    y = g.transpose(x, (0, 3, 1, 2))
    y = g.relu(g.conv(y, 6, 3))
    y = g.relu(g.conv(y, 4, 3, stride=2))
    y = g.transpose(y, (0, 2, 3, 1))
    y = g.reshape(y, (1, -1))
    y = g.matmul(y, 10)
    y = g.add(y, g.f32(g.rng.normal(0, 0.1, 10), "mm_bias"))
    return g.build(y)


@_register()
def flatten_gemm(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """x(1,3,8,8) -> Conv(3->4,k3,p1) -> Relu -> Flatten -> Gemm(transB=1, 256->10).

    MACs = 4*3*9*64 + 10*256 = 6912 + 2560 = 9472.
    """
    g = GraphBuilder(opset, seed, "flatten_gemm")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 4, 3))
    y = g.gemm(g.flatten(y), 10, trans_b=1)
    return g.build(y)


@_register()
def reshape_gemm(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Reshape([1,-1]) -> Gemm(transB=1)."""
    g = GraphBuilder(opset, seed, "reshape_gemm")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 5, 3, stride=2))
    y = g.gemm(g.reshape(y, (1, -1)), 7, trans_b=1)
    return g.build(y)


@_register()
def gap_gemm(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> GlobalAveragePool -> Flatten -> Gemm(transB=1) -> Relu -> Gemm(transB=0)."""
    g = GraphBuilder(opset, seed, "gap_gemm")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 12, 3))
    y = g.flatten(g.gap(y))
    y = g.relu(g.gemm(y, 8, trans_b=1))
    y = g.gemm(y, 5, trans_b=0)
    return g.build(y)


@_register()
def softmax_spatial(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Reshape(0,C,-1) -> Softmax(axis=2) -> Reshape(1,C,H,W) -> Mul with conv output -> Conv."""
    g = GraphBuilder(opset, seed, "softmax_spatial")
    x = g.input((1, 3, 8, 8))
    c = g.relu(g.conv(x, 6, 3))
    a = g.conv(c, 6, 1)
    r = g.reshape(a, (0, 6, -1))
    r = g.softmax(r, axis=2)
    r = g.reshape(r, (1, 6, 8, 8))
    y = g.mul(r, a)
    y = g.conv(y, 4, 3)
    return g.build(y)


@_register()
def matmul_head(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> GAP -> Reshape([1,-1]) -> MatMul -> Add(bias)."""
    g = GraphBuilder(opset, seed, "matmul_head")
    x = g.input((1, 3, 10, 10))
    y = g.relu(g.conv(x, 8, 3))
    y = g.reshape(g.gap(y), (1, -1))
    y = g.matmul(y, 5)
    y = g.add(y, g.f32(g.rng.normal(0, 0.1, 5), "head_bias"))
    return g.build(y)


@_register()
def multi_output(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Two graph outputs; the first is also consumed further down (intermediate output)."""
    g = GraphBuilder(opset, seed, "multi_output")
    x = g.input((1, 3, 10, 10))
    s = g.relu(g.conv(x, 8, 3))
    o1 = g.conv(s, 6, 3)
    y = g.relu(o1)
    o2 = g.gemm(g.flatten(g.gap(g.conv(y, 8, 3))), 4)
    return g.build([o1, o2])


@_register()
def unknown_op(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> LpNormalization(axis=1, p=2) -> Conv: a channel-mixing op onnxcc does not know."""
    g = GraphBuilder(opset, seed, "unknown_op")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 8, 3))
    y = g.node("LpNormalization", [y], g.shapes[y], axis=1, p=2)
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def unknown_op_s2d(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv -> SpaceToDepth(blocksize=2) -> Conv."""
    g = GraphBuilder(opset, seed, "unknown_op_s2d")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 4, 3))
    y = g.node("SpaceToDepth", [y], (1, 16, 4, 4), blocksize=2)
    y = g.conv(y, 6, 3)
    return g.build(y)


@_register()
def conv_constant_weights(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """Conv weights given by Constant nodes instead of initializers."""
    g = GraphBuilder(opset, seed, "conv_constant_weights")
    x = g.input((1, 3, 8, 8))
    y = g.relu(g.conv(x, 8, 3, weight_as_node=True))
    y = g.conv(y, 6, 3, weight_as_node=True)
    return g.build(y)


@_register([13, 17])
def runtime_anchors(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """A detector head that computes at run time what YOLOv8 exports do: an anchor grid (Shape ->
    Gather -> Cast -> Range) and a reshape target [N, C, -1] from the batch size, alive across
    the head's Convs; the head's output is reshaped by it and offset by the anchors."""
    g = GraphBuilder(opset, seed, "runtime_anchors")
    x = g.input((1, 3, 16, 16))
    s = g.relu(g.conv(x, 8, 3, stride=2))                       # (1, 8, 8, 8)
    shape = g.node("Shape", [s], (4,))
    batch, h, w = (g.node("Gather", [shape, g.i64(i, "at")], (), axis=0) for i in (0, 2, 3))
    target = g.node("Concat", [g.node("Unsqueeze", [batch, g.i64([0], "axes")], (1,)), g.i64([6, -1], "rest")],
                    (3,), axis=0)
    cells = g.node("Cast", [g.node("Mul", [h, w], ())], (), to=TensorProto.FLOAT)
    grid = g.node("Range", [g.f32(0.0), cells, g.f32(1.0)], (64,))
    t = g.relu(g.conv(s, 8, 3))
    t = g.add(g.relu(g.conv(t, 8, 3)), t)
    t = g.relu(g.conv(t, 8, 3))
    y = g.node("Reshape", [g.conv(t, 6, 1), target], (1, 6, 64))
    return g.build(g.add(y, g.mul(g.reshape(grid, (1, 1, 64)), g.f32(0.01))))


@_register()
def tiny_resnet(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """ResNet-ish, 10 convs: stem, 2 identity blocks, 1 projection block, 1 more identity, GAP->Flatten->Gemm."""
    g = GraphBuilder(opset, seed, "tiny_resnet")
    x = g.input((1, 3, 16, 16))
    s = g.relu(g.bn(g.conv(x, 8, 3, bias=False)))   # 1

    def basic(s, cout, stride):
        y = g.relu(g.bn(g.conv(s, cout, 3, stride=stride, bias=False)))
        y = g.bn(g.conv(y, cout, 3, bias=False))
        if stride != 1 or g.ch(s) != cout:
            s = g.bn(g.conv(s, cout, 1, stride=stride, bias=False))
        return g.relu(g.add(y, s))

    s = basic(s, 8, 1)    # 3
    s = basic(s, 8, 1)    # 5
    s = basic(s, 16, 2)   # 8
    s = basic(s, 16, 1)   # 10
    y = g.gemm(g.flatten(g.gap(s)), 10)
    return g.build(y)


@_register()
def tiny_mobilenet(opset: int = 13, *, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2/V3-ish, 11 convs: inverted residuals with ReLU6 / HardSwish, one SE, GAP->Flatten->Gemm."""
    g = GraphBuilder(opset, seed, "tiny_mobilenet")
    x = g.input((1, 3, 16, 16))
    s = g.hard_swish(g.bn(g.conv(x, 8, 3, stride=2, bias=False)))  # 1

    def inv_res(s, expand, cout, stride, act, se=False):
        cin = g.ch(s)
        y = g.act(g.bn(g.conv(s, expand, 1, bias=False)), act)
        y = g.act(g.bn(g.conv(y, expand, 3, stride=stride, group=expand, bias=False)), act)
        if se:
            z = g.relu(g.conv(g.gap(y), max(2, expand // 4), 1))
            z = g.hard_sigmoid(g.conv(z, expand, 1), alpha=1.0 / 6.0, beta=0.5)
            y = g.mul(y, z)
        y = g.bn(g.conv(y, cout, 1, bias=False))
        if stride == 1 and cin == cout:
            y = g.add(s, y)
        return y

    s = inv_res(s, 16, 8, 1, "clip")                   # 4
    s = inv_res(s, 24, 12, 2, "clip")                  # 7
    s = inv_res(s, 24, 12, 1, "hard_swish", se=True)   # 10 (+2 SE convs)
    s = g.hard_swish(g.bn(g.conv(s, 16, 1, bias=False)))  # 11
    y = g.gemm(g.flatten(g.gap(s)), 10)
    return g.build(y)
