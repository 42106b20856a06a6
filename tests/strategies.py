"""Hypothesis strategies that draw small random valid CNNs as ONNX models.

``cnn_models()`` draws an input ``(1, Cin, H, W)``, 2..8 blocks and a head.
Blocks: Conv (dense / grouped / depthwise, k 1|3, stride 1|2, symmetric or
asymmetric pads, with or without bias) optionally followed by BN and an
activation, standalone BN, activations, residual Add (identity or 1x1
projection shortcut), Concat of conv branches (optionally with the identity),
unequal channel Split with per-branch processing merged by Concat or Add,
SE-style Mul, Max/AveragePool, nearest x2 Resize, zero Pad + valid conv,
per-channel constant Add/Sub/Mul/Div, channel Slice. The head is
GlobalAveragePool -> Flatten -> Gemm or a plain conv output.

Nothing here runs onnxruntime; shapes are tracked statically by
:class:`GraphBuilder` (and cross-checked by the full ONNX checker through the
declared output shapes). Channels stay in 1..16 and spatial dims <= 16.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st

try:  # imported as ``tests.strategies``
    from .graphs import ACTIVATIONS, GraphBuilder
except ImportError:  # imported as top-level ``strategies`` (tests/ on sys.path)
    from graphs import ACTIVATIONS, GraphBuilder

__all__ = ["cnn_models", "BLOCKS", "STRATEGY_OPSETS"]

MAX_C = 16
MAX_HW = 16
STRATEGY_OPSETS = (9, 11, 13, 14, 18, 21)

BLOCKS = ("conv", "bn", "act", "residual", "concat", "split", "se", "pool",
          "resize", "pad", "const", "slice")


def _maybe_bn_act(draw, g: GraphBuilder, y: str, act_ok: bool = True) -> str:
    if draw(st.booleans()):
        y = g.bn(y)
    if act_ok and draw(st.booleans()):
        y = g.act(y, draw(st.sampled_from(ACTIVATIONS)))
    return y


def _conv_block(draw, g: GraphBuilder, x: str) -> str:
    _, cin, h, w = g.shapes[x]
    kind = draw(st.sampled_from(("dense", "dense", "grouped", "depthwise")))
    k = draw(st.sampled_from((1, 3)))
    stride = draw(st.sampled_from((1, 1, 2))) if min(h, w) >= 2 else 1
    if k == 1:
        pad = 0
    else:
        choices = [1, (1, 1, 1, 1)]
        if min(h, w) >= 2:  # asymmetric pads shrink by 1 (or TF-style 'SAME' at stride 2)
            choices += [(0, 1, 1, 0), (1, 0, 0, 1), (0, 0, 1, 1)]
        if min(h, w) >= 3:
            choices.append(0)
        pad = draw(st.sampled_from(choices))
    if kind == "grouped":
        groups = [gr for gr in (2, 3, 4) if cin % gr == 0]
        if not groups:
            kind = "dense"
        else:
            gr = draw(st.sampled_from(groups))
            cout = gr * draw(st.integers(1, MAX_C // gr))
    if kind == "depthwise":
        gr = cin
        mult = draw(st.sampled_from([m for m in (1, 2) if cin * m <= MAX_C]))
        cout = cin * mult
    if kind == "dense":
        gr = 1
        cout = draw(st.integers(2, MAX_C))
    bias = draw(st.booleans())
    y = g.conv(x, cout, k, stride=stride, pad=pad, group=gr, bias=bias)
    return _maybe_bn_act(draw, g, y)


def _same_conv(draw, g: GraphBuilder, x: str, cout: int, stride: int = 1) -> str:
    """Conv that keeps spatial size (k1 p0 or k3 p1)."""
    k = draw(st.sampled_from((1, 3)))
    return g.conv(x, cout, k, stride=stride, pad=k // 2, bias=draw(st.booleans()))


def _residual(draw, g: GraphBuilder, x: str) -> str:
    _, c, h, w = g.shapes[x]
    if draw(st.booleans()):  # identity shortcut
        mid = draw(st.integers(2, MAX_C))
        y = g.conv(x, mid, 3, pad=1, bias=draw(st.booleans()))
        y = _maybe_bn_act(draw, g, y)
        y = g.conv(y, c, 3, pad=1, bias=draw(st.booleans()))
        y = _maybe_bn_act(draw, g, y, act_ok=False)
        short = x
    else:  # projection shortcut
        cout = draw(st.integers(2, MAX_C))
        stride = draw(st.sampled_from((1, 2))) if min(h, w) >= 2 else 1
        y = g.conv(x, cout, 3, stride=stride, pad=1, bias=draw(st.booleans()))
        y = _maybe_bn_act(draw, g, y)
        y = g.conv(y, cout, 3, pad=1, bias=draw(st.booleans()))
        y = _maybe_bn_act(draw, g, y, act_ok=False)
        short = g.conv(x, cout, 1, stride=stride, pad=0, bias=draw(st.booleans()))
        if draw(st.booleans()):
            short = g.bn(short)
    y = g.add(y, short) if draw(st.booleans()) else g.add(short, y)
    if draw(st.booleans()):
        y = g.act(y, draw(st.sampled_from(ACTIVATIONS)))
    return y


def _concat(draw, g: GraphBuilder, x: str) -> str:
    c = g.ch(x)
    with_identity = c < MAX_C - 1 and draw(st.booleans())
    budget = MAX_C - (c if with_identity else 0)
    nb = draw(st.integers(1 if with_identity else 2, min(3, budget)))
    parts: list[str] = []
    for i in range(nb):
        room = budget - sum(g.ch(p) for p in parts) - (nb - 1 - i)
        cout = draw(st.integers(1, max(1, min(8, room))))
        parts.append(_maybe_bn_act(draw, g, _same_conv(draw, g, x, cout)))
    if with_identity:
        parts.insert(draw(st.integers(0, len(parts))), x)
    return g.concat(parts)


def _split(draw, g: GraphBuilder, x: str) -> str:
    c = g.ch(x)
    if c < 3:
        return x
    n = draw(st.integers(2, min(3, c - 1)))
    # num_outputs chunks are ceil(c/n) with a smaller last one; skip n where
    # that would leave an empty last chunk (e.g. c=4, n=3 -> 2, 2, 0)
    chunk = -(-c // n)
    use_num_outputs = g.opset >= 18 and chunk * (n - 1) < c and draw(st.booleans())
    if use_num_outputs:
        parts = g.split(x, num_outputs=n)
    else:
        # unequal sizes: draw cut points, reject the all-equal case
        cuts = draw(st.lists(st.integers(1, c - 1), min_size=n - 1, max_size=n - 1, unique=True))
        cuts = sorted(cuts)
        sizes = [b - a for a, b in zip([0] + cuts, cuts + [c])]
        if len(set(sizes)) == 1:  # n <= c - 1, so equal sizes are >= 2
            sizes = [sizes[0] + 1] + sizes[1:-1] + [sizes[-1] - 1]
        parts = g.split(x, sizes)
    merge = draw(st.sampled_from(("concat", "add")))
    if merge == "add":
        cout = draw(st.integers(2, MAX_C))
        outs = [_maybe_bn_act(draw, g, _same_conv(draw, g, p, cout)) for p in parts]
        y = outs[0]
        for o in outs[1:]:
            y = g.add(y, o)
        return y
    hows = [draw(st.sampled_from(("none", "act", "conv"))) for _ in parts]
    # minimal channel contribution of each part, to keep the concat <= MAX_C
    mins = [1 if how == "conv" else g.ch(p) for p, how in zip(parts, hows)]
    outs = []
    used = 0
    for i, (p, how) in enumerate(zip(parts, hows)):
        if how == "act":
            p = g.act(p, draw(st.sampled_from(ACTIVATIONS)))
        elif how == "conv":
            room = MAX_C - used - sum(mins[i + 1:])
            cout = draw(st.integers(1, max(1, min(5, room))))
            p = _maybe_bn_act(draw, g, _same_conv(draw, g, p, cout))
        used += g.ch(p)
        outs.append(p)
    if draw(st.booleans()):
        outs = draw(st.permutations(outs))
    return g.concat(outs)


def _se(draw, g: GraphBuilder, x: str) -> str:
    c = g.ch(x)
    r = draw(st.integers(1, max(1, c)))
    s = g.gap(x) if draw(st.booleans()) else g.reduce_mean(x)
    s = g.conv(s, r, 1, pad=0)
    s = g.relu(s) if draw(st.booleans()) else g.hard_swish(s)
    s = g.conv(s, c, 1, pad=0)
    s = g.sigmoid(s) if draw(st.booleans()) else g.hard_sigmoid(s, alpha=1.0 / 6.0, beta=0.5)
    return g.mul(x, s) if draw(st.booleans()) else g.mul(s, x)


def _pool(draw, g: GraphBuilder, x: str) -> str:
    _, _, h, w = g.shapes[x]
    op = draw(st.sampled_from(("max", "avg")))
    if min(h, w) >= 2 and draw(st.booleans()):
        k, s, p = 2, 2, 0
    else:
        k, s, p = 3, 1, 1
    return g.maxpool(x, k, s, p) if op == "max" else g.avgpool(x, k, s, p)


def _const(draw, g: GraphBuilder, x: str, seed: int) -> str:
    c = g.ch(x)
    rng = np.random.default_rng(seed)
    op = draw(st.sampled_from(("add", "sub", "mul", "div")))
    shape = draw(st.sampled_from(((1, c, 1, 1), (c, 1, 1), ())))
    if op in ("mul", "div"):
        vals = rng.uniform(0.5, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    else:
        vals = rng.normal(0, 0.5, shape)
    k = g.f32(vals, f"{op}c", as_node=draw(st.booleans()))
    if op in ("add", "mul") and draw(st.booleans()):
        return getattr(g, op)(k, x)
    return getattr(g, op)(x, k)


def _block(draw, g: GraphBuilder, x: str, kind: str, seed: int) -> str:
    _, c, h, w = g.shapes[x]
    if kind == "conv":
        return _conv_block(draw, g, x)
    if kind == "bn":
        return _maybe_bn_act(draw, g, g.bn(x))
    if kind == "act":
        return g.act(x, draw(st.sampled_from(ACTIVATIONS)))
    if kind == "residual":
        return _residual(draw, g, x)
    if kind == "concat":
        return _concat(draw, g, x)
    if kind == "split":
        return _split(draw, g, x)
    if kind == "se":
        return _se(draw, g, x)
    if kind == "pool":
        return _pool(draw, g, x)
    if kind == "resize":
        if 2 * h > MAX_HW or 2 * w > MAX_HW:
            return _pool(draw, g, x)
        return g.upsample2x(x)
    if kind == "pad":
        room_h, room_w = max(0, MAX_HW - h), max(0, MAX_HW - w)
        t = draw(st.integers(0, min(2, room_h)))
        b = draw(st.integers(0, min(2, room_h - t)))
        l = draw(st.integers(0, min(2, room_w)))
        r = draw(st.integers(0, min(2, room_w - l)))
        y = g.pad(x, (t, l, b, r))
        if min(h + t + b, w + l + r) >= 3 and draw(st.booleans()):
            y = g.conv(y, draw(st.integers(2, MAX_C)), 3, pad=0, bias=draw(st.booleans()))
        return y
    if kind == "const":
        return _const(draw, g, x, seed)
    if kind == "slice":
        if c < 2:
            return x
        start = draw(st.integers(0, c - 2))
        end = draw(st.integers(start + 1, c))
        return g.slice(x, start, end, axis=1)
    raise ValueError(kind)


@st.composite
def cnn_models(draw, min_blocks: int = 2, max_blocks: int = 8,
               opsets: tuple[int, ...] = STRATEGY_OPSETS,
               blocks: tuple[str, ...] = BLOCKS) -> onnx.ModelProto:
    """Draw a small random CNN as an ``onnx.ModelProto`` with input ``"x"``."""
    seed = draw(st.integers(0, 2**31 - 1))
    opset = draw(st.sampled_from(opsets))
    cin = draw(st.integers(1, 8))
    h = draw(st.integers(4, MAX_HW))
    w = draw(st.integers(4, MAX_HW))
    g = GraphBuilder(opset, seed, "hypothesis_cnn")
    y = g.input((1, cin, h, w))
    # always start with a conv so there is something to compress
    y = _conv_block(draw, g, y)
    n_blocks = draw(st.integers(min_blocks, max_blocks))
    for i in range(n_blocks - 1):
        kind = draw(st.sampled_from(blocks))
        y = _block(draw, g, y, kind, seed + i)
        assert 1 <= g.ch(y) <= MAX_C and 1 <= min(g.shapes[y][2:]) and max(g.shapes[y][2:]) <= MAX_HW, \
            (kind, g.shapes[y])
    head = draw(st.sampled_from(("gemm", "conv")))
    if head == "gemm":
        y = g.flatten(g.gap(y))
        y = g.gemm(y, draw(st.integers(2, 10)), trans_b=draw(st.sampled_from((0, 1))),
                   bias=draw(st.booleans()))
    else:
        y = g.conv(y, draw(st.integers(1, 8)), draw(st.sampled_from((1, 3))), bias=draw(st.booleans()))
    return g.build(y)
