"""The bundled example is a trained model with real samples: it classifies the held-out test images,
and its calibration samples are none of them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from oracles import check_model_full

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_bundled_model_is_trained_and_its_samples_are_disjoint():
    import onnx

    check_model_full(onnx.load(EXAMPLES / "animal_cnn.onnx"))
    calib, ev = np.load(EXAMPLES / "animal_calib.npy"), np.load(EXAMPLES / "animal_eval.npz")
    x, y = ev["x"], ev["y"]
    assert calib.shape[1:] == x.shape[1:] == (1, 28, 28) and len(calib) >= 200 and len(x) >= 1000
    sess = ort.InferenceSession(str(EXAMPLES / "animal_cnn.onnx"), providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {"image": x[i:i + 256]})[0].argmax(1) for i in range(0, len(x), 256)])
    assert (pred == y).mean() > 0.95          # trained: chance is 10%
    assert not {c.tobytes() for c in calib} & {e.tobytes() for e in x}
