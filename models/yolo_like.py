"""A small YOLOv8-style detector (random weights, deterministic), input 1x3x160x160.

Graph features it exercises once exported (opset 13, legacy exporter):

* Conv-BN-SiLU blocks; SiLU exports as ``Mul(x, Sigmoid(x))``
* C2f blocks: ``chunk`` -> ``Split``, ``Concat``, bottleneck residual ``Add``
* SPPF: chained ``MaxPool`` + ``Concat``
* PAN/FPN neck: ``nn.Upsample(nearest)`` -> ``Resize``, ``Concat``, stride-2 convs
* decoupled Detect head per scale (P3/P4/P5: 20x20, 10x10, 5x5), each output
  ``Reshape``d to (N, no, -1) and ``Concat``-ed on the anchor axis (525 anchors),
  DFL (``Softmax`` + fixed 1x1 ``Conv``), anchor decode (dist2bbox, ``Sub``/``Add``/``Mul``)
  and ``Sigmoid`` on class scores.  Output "output": (1, 4 + nc, 525).

BatchNorm affine params and running statistics are randomised so folding matters.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import randomize_bn

__all__ = ["YoloLike", "build", "INPUT_SHAPE"]

INPUT_SHAPE = (1, 3, 160, 160)


class Conv(nn.Module):
    """Conv2d(bias=False) - BatchNorm2d - SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 1.0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3)
        self.cv2 = Conv(c_, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over reg_max bins, then a fixed 1x1 conv with weights 0..reg_max-1."""

    def __init__(self, c1: int, na: int):
        super().__init__()
        self.na = na
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        # static sizes (-1 for the batch) so the exported Reshape targets are constants
        return self.conv(x.view(-1, 4, self.c1, self.na).transpose(2, 1).softmax(1)).view(-1, 4, self.na)


class Detect(nn.Module):
    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], img_size: int, reg_max: int = 8):
        super().__init__()
        self.nc = nc
        self.reg_max = reg_max
        self.no = nc + 4 * reg_max
        c2 = max(16, ch[0] // 4, 4 * reg_max)
        c3 = max(ch[0], min(nc, 64))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for x in ch)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch)
        anchors, stride_t = [], []
        self.sizes = [(img_size // s) ** 2 for s in strides]
        self.dfl = DFL(reg_max, sum(self.sizes))
        for s in strides:
            n = img_size // s
            sy, sx = torch.meshgrid(torch.arange(n, dtype=torch.float32) + 0.5, torch.arange(n, dtype=torch.float32) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), 0).view(2, -1))
            stride_t.append(torch.full((1, n * n), float(s)))
        self.register_buffer("anchors", torch.cat(anchors, 1).unsqueeze(0))  # (1, 2, A)
        self.register_buffer("strides", torch.cat(stride_t, 1).unsqueeze(0))  # (1, 1, A)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        outs = [torch.cat((self.cv2[i](x), self.cv3[i](x)), 1).view(-1, self.no, self.sizes[i]) for i, x in enumerate(xs)]
        y = torch.cat(outs, 2)  # (N, no, A)
        box, cls = y.split((4 * self.reg_max, self.nc), 1)
        lt, rb = self.dfl(box).split((2, 2), 1)
        x1y1 = self.anchors - lt
        x2y2 = self.anchors + rb
        xywh = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((xywh, cls.sigmoid()), 1)


class YoloLike(nn.Module):
    def __init__(self, nc: int = 8, img_size: int = 160):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)  # /2
        self.down1 = Conv(16, 32, 3, 2)  # /4
        self.c2f1 = C2f(32, 32, 1, True)
        self.down2 = Conv(32, 64, 3, 2)  # /8
        self.c2f2 = C2f(64, 64, 2, True)  # P3
        self.down3 = Conv(64, 64, 3, 2)  # /16
        self.c2f3 = C2f(64, 64, 1, True)  # P4
        self.down4 = Conv(64, 64, 3, 2)  # /32
        self.c2f4 = C2f(64, 64, 1, True)
        self.sppf = SPPF(64, 64, 5)  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n_c2f1 = C2f(128, 64, 1)  # up(P5)+P4
        self.n_c2f2 = C2f(128, 32, 1)  # up(.)+P3 -> out P3
        self.n_down1 = Conv(32, 32, 3, 2)
        self.n_c2f3 = C2f(96, 64, 1)  # -> out P4
        self.n_down2 = Conv(64, 64, 3, 2)
        self.n_c2f4 = C2f(128, 64, 1)  # -> out P5
        self.detect = Detect(nc, (32, 64, 64), (8, 16, 32), img_size)

    def forward(self, x):
        x = self.c2f1(self.down1(self.stem(x)))
        p3 = self.c2f2(self.down2(x))
        p4 = self.c2f3(self.down3(p3))
        p5 = self.sppf(self.c2f4(self.down4(p4)))
        n4 = self.n_c2f1(torch.cat((self.up(p5), p4), 1))
        o3 = self.n_c2f2(torch.cat((self.up(n4), p3), 1))
        o4 = self.n_c2f3(torch.cat((self.n_down1(o3), n4), 1))
        o5 = self.n_c2f4(torch.cat((self.n_down2(o4), p5), 1))
        return self.detect([o3, o4, o5])


def build(seed: int = 0, nc: int = 8) -> YoloLike:
    """Deterministic random-weight model in eval mode with randomised BN statistics."""
    torch.manual_seed(seed)
    model = YoloLike(nc=nc, img_size=INPUT_SHAPE[-1])
    randomize_bn(model, seed)
    return model.eval()
