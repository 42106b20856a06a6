"""Small trained networks of the shapes users bring, with the synthetic data they learn from.

Each shape once broke onnxcc on a real model (a keras audio net, a plain classifier with a hidden
dense layer, a Siamese net, a ResNet without BatchNorm whose shortcuts pad channels). They are
trained here — on tones and textures generated from a seed, so nothing is downloaded — because
fidelity only means something on a network that computes something:

- ``audio``: raw waveform → two fixed Conv1D DFT bases (real, imaginary) → magnitude → a Conv2D
  stack over (frames × frequency bins) → dense. The bins of the Conv1D become a *spatial* axis.
- ``hidden``: 8 × Conv-BN-ReLU with MaxPool, global pooling, Gemm 64→128, ReLU, Gemm 128→4.
- ``siamese``: one trunk read by two inputs (every Conv weight shared by two nodes), |a − b| → dense.
- ``padres``: a ResNet whose Convs are followed by per-channel Mul+Add (no BatchNorm) and whose
  downsampling shortcuts subsample and zero-pad the channel axis (ResNet "option A").
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

RATE, SECONDS, FRAME, HOP = 8000, 0.5, 160, 80
BANDS = ((150, 400), (400, 900), (900, 1800), (1800, 3600))   # Hz, one class each


def tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Waveforms [n, RATE·SECONDS] of a tone (with a weaker harmonic and noise) whose pitch falls
    in one of four bands; the band is the label."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(RATE * SECONDS)) / RATE
    y = rng.integers(0, len(BANDS), n)
    f = np.array([rng.uniform(*BANDS[c]) for c in y])[:, None]
    amp = rng.uniform(0.2, 1.0, (n, 1))
    x = amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    x += 0.3 * amp * np.sin(4 * np.pi * f * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    x += rng.normal(0, rng.uniform(0.02, 0.3, (n, 1)), x.shape)
    return x.astype(np.float32), y


def textures(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Colour images [n, 3, size, size]: horizontal, vertical or diagonal stripes, or blobs, at a
    random frequency, phase, colour and noise level; the pattern is the label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    y = rng.integers(0, 4, n)
    out = np.empty((n, 3, size, size), np.float32)
    for i, c in enumerate(y):
        k, ph = rng.uniform(3, 8) * 2 * np.pi, rng.uniform(0, 2 * np.pi)
        coord = (yy, xx, (xx + yy) / np.sqrt(2))[c] if c < 3 else None
        wave = np.sin(k * coord + ph) if coord is not None else np.sin(k * xx + ph) * np.sin(k * yy + ph)
        colour = rng.uniform(-1, 1, (3, 1, 1))
        out[i] = colour * wave + rng.uniform(-0.5, 0.5, (3, 1, 1)) + rng.normal(0, rng.uniform(0.05, 0.4), (3, size, size))
    return out, y


class AudioNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        bins = FRAME // 2 + 1
        n, k = np.arange(FRAME), np.arange(bins)[:, None]
        window = np.hanning(FRAME)
        self.re = nn.Conv1d(FRAME, bins, 1, bias=False)
        self.im = nn.Conv1d(FRAME, bins, 1, bias=False)
        with torch.no_grad():   # fixed DFT bases, as keras exports an STFT front end
            self.re.weight.copy_(torch.tensor(window * np.cos(2 * np.pi * k * n / FRAME))[..., None])
            self.im.weight.copy_(torch.tensor(-window * np.sin(2 * np.pi * k * n / FRAME))[..., None])
        for p in (*self.re.parameters(), *self.im.parameters()):
            p.requires_grad_(False)
        layers, widths = [], (1, 16, 32, 32, 32)
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], len(BANDS))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        frames = wav.unfold(1, FRAME, HOP).transpose(1, 2)                 # N, FRAME, frames
        mag = torch.sqrt(self.re(frames) ** 2 + self.im(frames) ** 2 + 1e-6)   # N, bins, frames
        x = torch.log1p(mag).transpose(1, 2).unsqueeze(1)                  # N, 1, frames, bins
        return self.fc(self.body(x).mean((2, 3)))


class HiddenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers, widths = [], (3, 16, 16, 32, 32, 48, 48, 64, 64)
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
            if i % 2:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.hidden = nn.Linear(64, 128)
        self.out = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(self.body(x).mean((2, 3)))))


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.abs(self.trunk(a) - self.trunk(b)))


class _Affine(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c, 1, 1))
        self.shift = nn.Parameter(torch.zeros(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class _PadBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _Affine(cout)
        self.c2, self.a2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _Affine(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a2(self.c2(F.relu(self.a1(self.c1(x)))))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return F.relu(y + short)


class PadResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.blocks = nn.Sequential(_PadBlock(16, 16, 1), _PadBlock(16, 32, 2), _PadBlock(32, 32, 1),
                                    _PadBlock(32, 64, 2), _PadBlock(64, 64, 1))
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _pairs(n: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Two texture images per sample; label 1 where they show the same pattern."""
    rng = np.random.default_rng(seed + 7)
    a, ya = textures(n, seed)
    b, yb = textures(n, seed + 1)
    same = rng.random(n) < 0.5
    for i in np.flatnonzero(same & (ya != yb)):   # draw until the pattern matches
        while True:
            img, lab = textures(1, int(rng.integers(1 << 30)))
            if lab[0] == ya[i]:
                b[i], yb[i] = img[0], lab[0]
                break
    return (a, b), (ya == yb).astype(np.int64)


@dataclass(frozen=True)
class Shape:
    build: Callable[[], nn.Module]
    data: Callable[[int, int], tuple[tuple[np.ndarray, ...], np.ndarray]]
    inputs: tuple[str, ...]
    steps: int


SHAPES: dict[str, Shape] = {
    "audio": Shape(AudioNet, lambda n, s: ((tones(n, s)[0],), tones(n, s)[1]), ("wav",), 300),
    "hidden": Shape(HiddenHead, lambda n, s: ((textures(n, s)[0],), textures(n, s)[1]), ("x",), 400),
    "siamese": Shape(Siamese, _pairs, ("a", "b"), 400),
    "padres": Shape(PadResNet, lambda n, s: ((textures(n, s)[0],), textures(n, s)[1]), ("x",), 400),
}


def data(name: str, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``n`` samples of the shape's task as ONNX feeds, and their labels."""
    xs, y = SHAPES[name].data(n, seed)
    return dict(zip(SHAPES[name].inputs, xs)), y


def train(name: str, seed: int = 0, batch: int = 64) -> nn.Module:
    """The shape's network trained with Adam on freshly drawn batches (no sample seen twice)."""
    spec = SHAPES[name]
    torch.manual_seed(seed)
    model = spec.build()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=spec.steps)
    model.train()
    for step in range(spec.steps):
        xs, y = spec.data(batch, 10_000 + seed * spec.steps + step)
        loss = F.cross_entropy(model(*(torch.from_numpy(x) for x in xs)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: nn.Module, name: str, n: int = 512, seed: int = 1) -> float:
    xs, y = SHAPES[name].data(n, seed)
    with torch.no_grad():
        pred = model(*(torch.from_numpy(x) for x in xs)).argmax(1).numpy()
    return float((pred == y).mean())


def to_onnx(model: nn.Module, name: str, opset: int = 17) -> onnx.ModelProto:
    """The trained network as ONNX with a dynamic batch (legacy exporter, as most users' files)."""
    spec = SHAPES[name]
    xs, _ = spec.data(2, 0)
    buf = io.BytesIO()
    torch.onnx.export(model, tuple(torch.from_numpy(x) for x in xs), buf, input_names=list(spec.inputs),
                      output_names=["logits"], dynamic_axes={k: {0: "n"} for k in spec.inputs},
                      opset_version=opset, dynamo=False)
    return onnx.load_from_string(buf.getvalue())
