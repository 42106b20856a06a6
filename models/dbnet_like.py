"""A small DBNet-style OCR text detector (random weights, deterministic), input 1x3x160x160.

* backbone: ResNet-ish (Conv-BN-ReLU stem /2, MaxPool /4, four stages of BasicBlocks,
  stride-2 stages with 1x1 Conv-BN downsample shortcuts, residual ``Add`` + ``Relu``)
  giving C2..C5 at 1/4, 1/8, 1/16, 1/32
* DB-FPN (as PaddleOCR's ``DBFPN``): 1x1 lateral convs, nearest ``Resize`` x2 + ``Add``
  top-down, 3x3 smoothing convs to inner/4 channels, ``Resize`` of every level to 1/4
  and ``Concat``
* DB head (probability map branch): Conv3x3-BN-ReLU -> ConvTranspose(2,2)-BN-ReLU ->
  ConvTranspose(2,2) -> ``Sigmoid``; output "output": (N, 1, 160, 160)

BatchNorm affine params and running statistics are randomised so folding matters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .common import randomize_bn

__all__ = ["DBNetLike", "build", "INPUT_SHAPE"]

INPUT_SHAPE = (1, 3, 160, 160)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class Backbone(nn.Module):
    def __init__(self, widths=(16, 32, 48, 64), blocks=(2, 2, 2, 1)):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(widths)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for s in self.stages:
            x = s(x)
            outs.append(x)
        return outs


class DBFPN(nn.Module):
    def __init__(self, in_channels, out_channels: int = 64):
        super().__init__()
        self.in_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=False) for c in in_channels)
        self.p_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels // 4, 3, padding=1, bias=False) for _ in in_channels)
        self.out_channels = out_channels

    def forward(self, feats):
        c2, c3, c4, c5 = feats
        in2, in3, in4, in5 = (conv(f) for conv, f in zip(self.in_convs, feats))
        out4 = in4 + F.interpolate(in5, scale_factor=2.0, mode="nearest")
        out3 = in3 + F.interpolate(out4, scale_factor=2.0, mode="nearest")
        out2 = in2 + F.interpolate(out3, scale_factor=2.0, mode="nearest")
        p2, p3, p4, p5 = (conv(f) for conv, f in zip(self.p_convs, (out2, out3, out4, in5)))
        p5 = F.interpolate(p5, scale_factor=8.0, mode="nearest")
        p4 = F.interpolate(p4, scale_factor=4.0, mode="nearest")
        p3 = F.interpolate(p3, scale_factor=2.0, mode="nearest")
        return torch.cat([p5, p4, p3, p2], dim=1)


class DBHead(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        mid = cin // 4
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.ConvTranspose2d(mid, mid, 2, 2)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.ConvTranspose2d(mid, 1, 2, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return torch.sigmoid(self.conv3(x))


class DBNetLike(nn.Module):
    def __init__(self, fpn_channels: int = 64):
        super().__init__()
        self.backbone = Backbone()
        self.neck = DBFPN(self.backbone.out_channels, fpn_channels)
        self.head = DBHead(fpn_channels)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def build(seed: int = 0) -> DBNetLike:
    """Deterministic random-weight model in eval mode with randomised BN statistics."""
    torch.manual_seed(seed)
    model = DBNetLike()
    randomize_bn(model, seed)
    return model.eval()
