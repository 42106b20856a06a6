"""MobileNetV2 with exactly torchvision's module tree and parameter names.

``torchvision`` is not a dependency, so the architecture is re-declared here
such that ``model.load_state_dict(torch.load("mobilenet_v2-b0353104.pth"))``
works with ``strict=True``:

* ``features.0`` = Conv-BN-ReLU6 stem (``features.0.0`` conv, ``features.0.1`` BN)
* ``features.1..17`` = InvertedResidual blocks with ``.conv`` sub-sequentials
* ``features.18`` = 1x1 Conv-BN-ReLU6 to 1280 channels
* ``classifier`` = ``Dropout(0.2)``, ``Linear(1280, 1000)`` (``classifier.1``)
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MobileNetV2", "InvertedResidual", "build", "export_onnx"]


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """torchvision's ``Conv2dNormActivation`` (Conv2d, BatchNorm2d, ReLU6) as children 0, 1, 2."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        assert stride in (1, 2)
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers.extend(
            [
                ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
                nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
                nn.BatchNorm2d(oup),
            ]
        )
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8, dropout: float = 0.2):
        super().__init__()
        input_channel = 32
        last_channel = 1280
        settings = [
            # t, c, n, s
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(3, input_channel, stride=2)]
        for t, c, n, s in settings:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build(weights_path: str | os.PathLike | None = None, seed: int = 0) -> MobileNetV2:
    """Build MobileNetV2 in eval mode; load torchvision ImageNet weights strictly if given."""
    torch.manual_seed(seed)
    model = MobileNetV2()
    if weights_path is not None:
        state = torch.load(os.fspath(weights_path), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model.eval()


def export_onnx(
    model: nn.Module, path: str | os.PathLike, opset: int = 13, input_size: int = 224, keep_bn: bool = False
) -> None:
    """Export with the legacy TorchScript exporter; input "input" (N,3,H,W), output "output" (N,1000), dynamic N.

    By default this is the plain eval-mode export users get from torchvision models
    (the exporter fuses BatchNorm into the Conv weights/bias); ``keep_bn=True`` keeps
    ``BatchNormalization`` nodes instead.
    """
    from .common import export

    export(model, path, (1, 3, input_size, input_size), opset, dynamic_batch=True, keep_bn=keep_bn)
