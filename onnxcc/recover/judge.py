"""How far a compressed model's outputs are from the original's, judged as compress judges them.

The compared tensors are :func:`onnxcc.outputs.targets` (the logits behind a Softmax, each dense
output standardised per channel by the original's statistics); the damage is their mean relative
squared error, the quantity the search minimises.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import onnx

from ..analysis.view import batch_fixed_at_one
from ..outputs import Standardizer, targets
from ..runtime import expose_outputs, make_session

BATCH = 8


def run_outputs(model: onnx.ModelProto, names: list[str], feeds: Mapping[str, np.ndarray],
                provider: str = "cpu") -> list[np.ndarray]:
    """The named tensors of ``model`` on ``feeds`` (a leading sample axis), in small batches."""
    return run_batched(make_session(expose_outputs(model, names), provider), names, feeds, batch_size(model))


def batch_size(model: onnx.ModelProto) -> int:
    """BATCH, or 1 for a model with an input fixed at batch 1."""
    return 1 if batch_fixed_at_one(model) else BATCH


def run_batched(sess, names: list[str], feeds: Mapping[str, np.ndarray], batch: int,
                shared: Callable[[int], Mapping[str, np.ndarray]] | None = None) -> list[np.ndarray]:
    """``sess``'s named outputs over ``feeds`` (a leading sample axis), ``batch`` samples a run;
    ``shared``: the inputs without a sample axis, for a batch of a given size."""
    n = len(next(iter(feeds.values())))
    wanted = {i.name for i in sess.get_inputs()}

    def run(part: dict[str, np.ndarray]) -> list[np.ndarray]:
        if shared is not None:
            size = len(next(iter(part.values())))
            part.update({k: v for k, v in shared(size).items() if k in wanted})
        return sess.run(names, part)

    parts = [run({k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]


class OutputJudge:
    """The original's outputs on a fixed set of samples; the damage of any candidate on them."""

    def __init__(self, teacher: onnx.ModelProto, feeds: Mapping[str, np.ndarray], provider: str = "cpu"):
        self.names = [t.tensor for t in targets(teacher)]
        self.feeds, self.provider = dict(feeds), provider
        self.standardizers = [Standardizer(r) for r in run_outputs(teacher, self.names, self.feeds, provider)]

    def damage(self, model: onnx.ModelProto) -> float:
        outs = run_outputs(model, self.names, self.feeds, self.provider)
        return float(np.mean([s.relative_error(o) for s, o in zip(self.standardizers, outs)]))
