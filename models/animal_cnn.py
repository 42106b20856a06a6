"""The bundled example's network: a small ResNet for 28x28 grey Animal-MNIST images.

Three stages (32, 64, 128 channels at 28, 14, 7 pixels) of one residual block each, global
average pooling and a 10-class head: wide enough per layer that onnxruntime's time goes into the
Convs (so removing MACs shows as speed), small enough to sit in the repository.
"""
from __future__ import annotations

from torch import nn


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.b = _conv_bn(cin, cout, stride), _conv_bn(cout, cout)
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return (self.b(self.a(x).relu()) + self.short(x)).relu()


class AnimalCNN(nn.Module):
    def __init__(self, classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(1, widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))
