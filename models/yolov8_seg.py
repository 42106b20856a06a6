"""A YOLOv8-seg-size segmentation network (random weights, deterministic) for scale benchmarks.

The layout of Ultralytics' YOLOv8 segmentation model, written with the blocks of
:mod:`models.yolo_like`: a C2f backbone with SPPF, a PAN neck, a decoupled head per scale
(boxes with DFL, class scores, 32 mask coefficients) and the mask prototype branch
(Conv, ``ConvTranspose`` ×2 upsampling, Conv, Conv). Two outputs: detections
``(N, 4 + nc + 32, anchors)`` and prototypes ``(N, 32, H/4, W/4)``.

``width`` and ``depth`` scale channels and C2f repeats as YOLOv8's n/s/m do (s: 0.5, 0.33).
At 576×576 the s-size network has 16.2 GMACs: the size issue 20's benchmark asks for.

The weights are random but the network is *live*: Kaiming-normal convolutions and BatchNorm
statistics taken from image-like inputs, so activations neither vanish nor drown in BN offsets
and the outputs depend on the input (with PyTorch's default init they do not, and a fidelity
measured on them says nothing).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import randomize_bn
from .yolo_like import C2f, SPPF, Conv, Detect

__all__ = ["YoloV8Seg", "build", "INPUT_SHAPE"]

INPUT_SHAPE = (1, 3, 576, 576)


class Proto(nn.Module):
    """The mask prototypes: the P3 features upsampled ×2 to a quarter of the input size."""

    def __init__(self, c1: int, c_: int, c2: int = 32):
        super().__init__()
        self.cv1 = Conv(c1, c_, 3)
        self.upsample = nn.ConvTranspose2d(c_, c_, 2, 2, 0, bias=True)
        self.cv2 = Conv(c_, c_, 3)
        self.cv3 = Conv(c_, c2, 1)

    def forward(self, x):
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


class Segment(Detect):
    """Detect plus a mask-coefficient head per scale and the prototype branch."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...], img_size: int,
                 nm: int = 32, npr: int = 256):
        super().__init__(nc, ch, strides, img_size, reg_max=16)
        c4 = max(ch[0] // 4, nm)
        self.cv4 = nn.ModuleList(nn.Sequential(Conv(x, c4, 3), Conv(c4, c4, 3), nn.Conv2d(c4, nm, 1)) for x in ch)
        self.proto = Proto(ch[0], npr, nm)

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        coefs = torch.cat([self.cv4[i](x).flatten(2) for i, x in enumerate(xs)], 2)
        return torch.cat((super().forward(xs), coefs), 1), self.proto(xs[0])


class YoloV8Seg(nn.Module):
    def __init__(self, nc: int = 80, img_size: int = 544, width: float = 0.5, depth: float = 0.33):
        super().__init__()
        c = [min(int(math.ceil(v * width / 8) * 8), int(1024 * width)) for v in (64, 128, 256, 512, 1024)]
        n = [max(round(v * depth), 1) for v in (3, 6, 6, 3)]
        self.backbone = nn.ModuleList([
            Conv(3, c[0], 3, 2), Conv(c[0], c[1], 3, 2), C2f(c[1], c[1], n[0], True),
            Conv(c[1], c[2], 3, 2), C2f(c[2], c[2], n[1], True),                         # P3
            Conv(c[2], c[3], 3, 2), C2f(c[3], c[3], n[2], True),                         # P4
            Conv(c[3], c[4], 3, 2), C2f(c[4], c[4], n[3], True), SPPF(c[4], c[4], 5),   # P5
        ])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n_c2f1 = C2f(c[4] + c[3], c[3], n[0])
        self.n_c2f2 = C2f(c[3] + c[2], c[2], n[0])          # -> out P3
        self.n_down1 = Conv(c[2], c[2], 3, 2)
        self.n_c2f3 = C2f(c[2] + c[3], c[3], n[0])          # -> out P4
        self.n_down2 = Conv(c[3], c[3], 3, 2)
        self.n_c2f4 = C2f(c[3] + c[4], c[4], n[0])          # -> out P5
        self.segment = Segment(nc, (c[2], c[3], c[4]), (8, 16, 32), img_size, npr=c[2])

    def forward(self, x):
        feats = []
        for i, m in enumerate(self.backbone):
            x = m(x)
            if i in (4, 6):
                feats.append(x)
        p3, p4, p5 = *feats, x
        n4 = self.n_c2f1(torch.cat((self.up(p5), p4), 1))
        o3 = self.n_c2f2(torch.cat((self.up(n4), p3), 1))
        o4 = self.n_c2f3(torch.cat((self.n_down1(o3), n4), 1))
        o5 = self.n_c2f4(torch.cat((self.n_down2(o4), p5), 1))
        return self.segment([o3, o4, o5])


def _image_like(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth noise with an image's spatial correlation: coarse noise upsampled, plus a little fine."""
    coarse = torch.randn(n, 3, size // 16, size // 16, generator=generator)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.1 * torch.randn(n, 3, size, size, generator=generator)


@torch.no_grad()
def _live_init(model: nn.Module, img_size: int, seed: int) -> None:
    """Kaiming-normal convolutions, then every BN's statistics from a pass over image-like noise."""
    g = torch.Generator().manual_seed(seed + 2000)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight.shape[0] * m.weight[0, 0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # a cumulative average over the calibration batches
    model.train()
    for _ in range(2):
        model(_image_like(2, img_size, g))
    model.eval()
    for m in bns:
        m.momentum = 0.03


def build(seed: int = 0, img_size: int = INPUT_SHAPE[-1], width: float = 0.5, depth: float = 0.33) -> YoloV8Seg:
    """Deterministic random-weight model in eval mode whose outputs depend on its input."""
    torch.manual_seed(seed)
    model = YoloV8Seg(img_size=img_size, width=width, depth=depth)
    randomize_bn(model, seed)        # non-trivial BN affine parameters (folding matters) ...
    _live_init(model, img_size, seed)   # ... and statistics that match the activations
    return model.eval()
