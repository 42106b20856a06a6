"""What a model's outputs are judged by, and how an original and a compressed output compare.

A graph output that is a Softmax/Sigmoid (or an ArgMax index), possibly reshaped after, is
judged on the tensor feeding it: saturated probabilities hide damage, and integer class indices
cannot be compared at all.
Dense-prediction outputs — (N, C, A) detector heads, (N, C, H, W) maps — mix channels of very
different scales (box coordinates in pixels beside 0–1 scores), so each channel is standardised
with the original's mean and spread before errors are summed: otherwise the largest-valued
channel decides everything and class scores can be ruined unnoticed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .ops import OPS, OutputKind

MIN_CLASSES = 10   # an unlabelled 2-D output this wide is taken for logits


@dataclass(frozen=True)
class Target:
    tensor: str        # the tensor compared
    output: str        # the graph output it stands for
    classifier: bool   # scores whose argmax is the prediction


def targets(model: onnx.ModelProto) -> list[Target]:
    producers = {o: n for n in model.graph.node for o in n.output}
    out: list[Target] = []
    for o in model.graph.output:
        name, classifier = o.name, False
        cur, n = o.name, producers.get(o.name)
        # through reshaping/renaming ops, as far as a Softmax/ArgMax lies behind them
        while n is not None and n.input and (kind := OPS.of(n).output) is not None:
            cur = n.input[0]
            if kind is not OutputKind.PASSES:
                classifier |= kind is OutputKind.CLASSIFIES
                name = cur
            n = producers.get(cur)
        if name not in {t.tensor for t in out}:
            out.append(Target(name, o.name, classifier))
    return out


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The channel axis of a dense output: 1 for (N, C, H, W) and (N, C, A) with C ≤ A, else 2."""
    if len(shape) < 3:
        return None
    return 1 if len(shape) > 3 or shape[1] <= shape[2] else 2


class Standardizer:
    """Per-channel centring and scaling by an original output's statistics (identity for
    outputs without a channel axis); keeps that output, standardised, to compare against."""

    def __init__(self, reference: np.ndarray):
        ref = np.asarray(reference, np.float64)
        ax = channel_axis(ref.shape)
        if ax is None:
            self.mu, self.sd = 0.0, 1.0
        else:
            other = tuple(i for i in range(ref.ndim) if i != ax)
            self.mu = ref.mean(other, keepdims=True)
            self.sd = ref.std(other, keepdims=True) + 1e-12
        self.reference = self(ref)
        self._energy = float(np.sum(self.reference ** 2))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = np.array(x, np.float64)   # in place from here: a detector's outputs are tens of MB a candidate
        y -= self.mu
        y /= self.sd
        return y

    def relative_error(self, out: np.ndarray) -> float:
        """‖out − reference‖² / ‖reference‖² in the standardised space."""
        d = self(out)
        d -= self.reference
        d = d.ravel()
        return float(np.dot(d, d) / (self._energy + 1e-30))


def compare(ref: np.ndarray, out: np.ndarray, target: Target) -> dict[str, Any]:
    """Per-sample cosine and relative L2 (standardised), top-1 agreement for classifiers."""
    std = Standardizer(ref)
    r, o = std.reference, std(out)
    r2, o2 = r.reshape(len(r), -1), o.reshape(len(o), -1)
    cos = (r2 * o2).sum(1) / (np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1) + 1e-30)
    res: dict[str, Any] = {
        "output": target.output,
        "cosine_mean": round(float(cos.mean()), 4),
        "cosine_min": round(float(cos.min()), 4),
        "rel_l2": round(float(np.linalg.norm(o2 - r2) / (np.linalg.norm(r2) + 1e-30)), 4),
    }
    if ref.ndim == 2 and ref.shape[1] > 1 and (target.classifier or ref.shape[1] >= MIN_CLASSES):
        res["top1_agreement"] = round(float((ref.argmax(1) == out.argmax(1)).mean()), 4)
    return res
