"""Graphs shaped like other exporters' output.

* :func:`to_paddle_style` - rewrite an ONNX model so every initializer becomes a
  ``Constant`` node (as Paddle2ONNX exports do); used for ``paddle_style_resnet.onnx``
  (:class:`PaddleResNet`, a small ResNet whose classifier is ``MatMul`` + ``Add`` like
  Paddle's ``Linear``) and ``paddle_style_dbnet.onnx`` (``dbnet_like``).
* :class:`TFStyleMobileNet` - a torch module mimicking a tf2onnx export: NHWC input
  ``Transpose``d to NCHW, explicit asymmetric TF "SAME" ``Pad`` before stride-2 convs,
  depthwise-separable / inverted-residual blocks with ReLU6 (``Clip``), HardSwish
  (``HardSigmoid`` + ``Mul`` at opset 11), squeeze-excite (``GlobalAveragePool`` -> conv ->
  relu -> conv -> ``HardSigmoid`` -> ``Mul``), then ``Transpose`` back to NHWC,
  ``Flatten`` and a ``Gemm`` classifier.
"""

from __future__ import annotations

import copy

import onnx
import torch
from onnx import helper
from torch import nn
from torch.nn import functional as F

from .common import randomize_bn

__all__ = [
    "to_paddle_style",
    "TFStyleMobileNet",
    "PaddleResNet",
    "build_tf_style_mobilenet",
    "build_paddle_resnet",
    "TF_STYLE_INPUT_SHAPE",
    "PADDLE_RESNET_INPUT_SHAPE",
]

TF_STYLE_INPUT_SHAPE = (1, 128, 128, 3)  # NHWC
PADDLE_RESNET_INPUT_SHAPE = (1, 3, 224, 224)


# --------------------------------------------------------------------------- Paddle style


def to_paddle_style(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` where each main-graph initializer is a ``Constant`` node.

    Each Constant is placed right before the first node that consumes it (so the node
    list stays topologically sorted); initializers that are also listed as graph inputs
    are removed from the inputs.  Sparse initializers become ``sparse_value`` Constants.
    """
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    sparse = {s.values.name: s for s in g.sparse_initializer}
    names = set(inits) | set(sparse)
    if not names:
        return m

    def make_const(name: str) -> onnx.NodeProto:
        if name in inits:
            t = copy.deepcopy(inits[name])
            t.name = ""  # the output name carries the identity
            return helper.make_node("Constant", [], [name], name=f"{name}__const", value=t)
        return helper.make_node("Constant", [], [name], name=f"{name}__const", sparse_value=copy.deepcopy(sparse[name]))

    new_nodes: list[onnx.NodeProto] = []
    emitted: set[str] = set()
    for node in g.node:
        used = list(node.input)
        # names used inside subgraphs (If/Loop bodies) also need the constant in scope
        for a in node.attribute:
            for sub in list(a.g and [a.g] or []) + list(a.graphs):
                for sn in sub.node:
                    used.extend(sn.input)
        for i in used:
            if i in names and i not in emitted:
                new_nodes.append(make_const(i))
                emitted.add(i)
        new_nodes.append(node)
    # initializers only referenced as graph outputs (or unused but declared) still exist
    for n in sorted(names - emitted):
        new_nodes.insert(0, make_const(n))

    del g.node[:]
    g.node.extend(new_nodes)
    del g.initializer[:]
    del g.sparse_initializer[:]
    keep_inputs = [i for i in g.input if i.name not in names]
    del g.input[:]
    g.input.extend(keep_inputs)
    return m


class _PaddleBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + s)


class PaddleResNet(nn.Module):
    """Small ResNet-18-like classifier (widths 16..128, two BasicBlocks per stage).

    Classifier: ``Flatten`` -> ``MatMul`` with a (in, out) weight -> ``Add`` bias, as Paddle's Linear exports.
    """

    def __init__(self, num_classes: int = 1000, widths=(16, 32, 64, 128), blocks=(2, 2, 2, 2)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(_PaddleBasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc_weight = nn.Parameter(torch.randn(cin, num_classes) * (1.0 / cin) ** 0.5)
        self.fc_bias = nn.Parameter(torch.randn(num_classes) * 0.01)

    def forward(self, x):
        x = self.layers(self.pool(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return torch.matmul(x, self.fc_weight) + self.fc_bias


def build_paddle_resnet(seed: int = 0) -> PaddleResNet:
    torch.manual_seed(seed)
    model = PaddleResNet()
    randomize_bn(model, seed)
    return model.eval()


# --------------------------------------------------------------------------- TF style


def _same_pad(k: int, s: int) -> tuple[int, int]:
    """TF "SAME" (before, after) padding for an input divisible by the stride."""
    total = max(k - s, 0)
    return total // 2, total - total // 2


class TFConvBN(nn.Module):
    """[Pad] - Conv - BN - act; stride-2 convs get explicit asymmetric TF "SAME" padding."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: str | None = "relu6"):
        super().__init__()
        if s == 1:
            self.pad = None
            padding = k // 2
        else:
            b, a = _same_pad(k, s)
            self.pad = (b, a, b, a)  # F.pad order: left, right, top, bottom
            padding = 0
        self.conv = nn.Conv2d(cin, cout, k, s, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)
        self.act = {"relu6": nn.ReLU6(), "hswish": nn.Hardswish(), "relu": nn.ReLU(), None: nn.Identity()}[act]

    def forward(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        mid = max(8, c // r)
        self.fc1 = nn.Conv2d(c, mid, 1)
        self.fc2 = nn.Conv2d(mid, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class TFBlock(nn.Module):
    """Inverted residual / depthwise-separable block: [1x1 expand] - [Pad] dw kxk - [SE] - 1x1 project (linear)."""

    def __init__(self, cin: int, exp: int, cout: int, k: int, s: int, act: str, se: bool):
        super().__init__()
        self.expand = TFConvBN(cin, exp, 1, act=act) if exp != cin else None
        self.dw = TFConvBN(exp, exp, k, s, groups=exp, act=act)
        self.se = SqueezeExcite(exp) if se else None
        self.project = TFConvBN(exp, cout, 1, act=None)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = x if self.expand is None else self.expand(x)
        y = self.dw(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class TFStyleMobileNet(nn.Module):
    """NHWC-input MobileNetV3-ish classifier, input (N,128,128,3), output (N,100)."""

    # cin, exp, cout, k, s, act, se
    CFG = [
        (16, 16, 16, 3, 2, "relu6", True),
        (16, 64, 24, 3, 2, "relu6", False),
        (24, 72, 24, 3, 1, "relu6", False),
        (24, 96, 40, 5, 2, "hswish", True),
        (40, 120, 40, 5, 1, "hswish", True),
        (40, 144, 48, 3, 2, "hswish", True),
    ]

    def __init__(self, num_classes: int = 100, img_size: int = 128):
        super().__init__()
        self.stem = TFConvBN(3, 16, 3, 2, act="hswish")
        self.blocks = nn.Sequential(*(TFBlock(*c) for c in self.CFG))
        self.head = TFConvBN(48, 64, 1, act="hswish")
        fm = img_size // 32
        self.fc = nn.Linear(fm * fm * 64, num_classes)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = self.head(self.blocks(self.stem(x)))
        x = x.permute(0, 2, 3, 1)  # back to NHWC before flattening, as TF's Flatten does
        return self.fc(torch.flatten(x, 1))


def build_tf_style_mobilenet(seed: int = 0) -> TFStyleMobileNet:
    torch.manual_seed(seed)
    model = TFStyleMobileNet(img_size=TF_STYLE_INPUT_SHAPE[1])
    randomize_bn(model, seed)
    return model.eval()
