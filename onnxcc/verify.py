"""Output fidelity of a compressed model against the original on held-back calibration samples
(the structural checks are :class:`onnxcc.passes.check.CheckPass`)."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .calib import Calibration
from .runtime import expose_outputs, make_session
from .outputs import compare, targets


def _outputs(model: onnx.ModelProto, names: list[str], held: Calibration, provider: str) -> list[np.ndarray]:
    sess = make_session(expose_outputs(model, names), provider)
    rows = [sess.run(names, held.take(slice(i, i + 1))) for i in range(len(held))]
    return [np.concatenate([r[j] for r in rows]).astype(np.float64) for j in range(len(names))]


def fidelity(original: onnx.ModelProto, compressed: onnx.ModelProto, held: Calibration,
             provider: str = "cpu") -> dict[str, Any]:
    """Per output (see :mod:`onnxcc.outputs`): cosine similarity and relative L2 per sample,
    top-1 agreement for classifiers. The first output's figures head the record."""
    ts = targets(original)
    names = [t.tensor for t in ts]
    per = [compare(o, c, t) for o, c, t in zip(_outputs(original, names, held, provider),
                                                 _outputs(compressed, names, held, provider), ts)]
    head = {k: v for k, v in per[0].items() if k != "output"}
    return {"samples": len(held), **head, **({"outputs": per} if len(per) > 1 else {})}
