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
from .sensitivity import damage_targets


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
    return {"macs": int(macs), "params_before": model_params(original), "params_after": model_params(compressed),
            "fidelity": fidelity(original, compressed, held, provider)}


def _outputs(model: onnx.ModelProto, held: Calibration, provider: str) -> list[np.ndarray]:
    targets = damage_targets(model)
    sess = make_session(expose_outputs(model, targets), provider)
    rows = [sess.run(targets, held.take(slice(i, i + 1))) for i in range(len(held))]
    return [np.concatenate([r[j] for r in rows]).astype(np.float64) for j in range(len(targets))]


def fidelity(original: onnx.ModelProto, compressed: onnx.ModelProto, held: Calibration,
             provider: str = "cpu") -> dict[str, Any]:
    """Cosine similarity and relative L2 of the logits per sample; top-1 agreement for (N, K)."""
    out: dict[str, Any] = {"samples": len(held)}
    o_all, c_all = _outputs(original, held, provider), _outputs(compressed, held, provider)
    o, c = o_all[0], c_all[0]
    o2, c2 = o.reshape(len(o), -1), c.reshape(len(c), -1)
    cos = (o2 * c2).sum(1) / (np.linalg.norm(o2, axis=1) * np.linalg.norm(c2, axis=1) + 1e-30)
    out["cosine_mean"] = round(float(cos.mean()), 4)
    out["cosine_min"] = round(float(cos.min()), 4)
    out["rel_l2"] = round(float(np.linalg.norm(o2 - c2) / (np.linalg.norm(o2) + 1e-30)), 4)
    if o.ndim == 2 and o.shape[1] > 1:
        out["top1_agreement"] = round(float((o.argmax(1) == c.argmax(1)).mean()), 4)
    return out
