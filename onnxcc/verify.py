"""Check an emitted model: full onnx checker, an onnxruntime run, MACs at runtime shapes, and
output fidelity against the original on held-back calibration samples."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from .analysis.costs import model_params, node_macs
from .analysis.view import build_view
from .calib import Calibration
from .errors import VerificationError
from .runtime import expose_outputs, make_session
from .outputs import compare, targets


def verify(original: onnx.ModelProto, compressed: onnx.ModelProto, held: Calibration,
           shapes: dict[str, tuple[int, ...]], provider: str = "cpu") -> dict[str, Any]:
    try:
        onnx.checker.check_model(compressed, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises several types
        raise VerificationError(f"compressed model fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    try:
        view = build_view(compressed, shapes, held.take(slice(0, 1)))
    except Exception as e:  # noqa: BLE001
        raise VerificationError(f"compressed model does not run: {e}") from None
    macs = sum(node_macs(view, n) for n in view.nodes)
    before, after = model_params(original), model_params(compressed)
    if after > before:   # e.g. a shared weight copied per reader: never what compression means
        raise VerificationError(f"compressed model has more parameters than the original ({before} -> {after})")
    return {"macs": int(macs), "params_before": before, "params_after": after,
            "fidelity": fidelity(original, compressed, held, provider)}


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
