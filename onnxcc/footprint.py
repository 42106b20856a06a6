"""What a compress run's search will hold at its peak, estimated before it starts.

A run that outgrows the machine is killed by the kernel with no message, after minutes of work
and with nothing written; an estimate from the model's shapes, checked before measuring, turns
that into a one-line error that says what holds the memory. The parts follow what the search
keeps (measured on a 16-GMAC YOLOv8-seg-size net and on open-nsfw, tools/results/scale.md):
the layer statistics' second moments (float32, one (columns + 1)² matrix per layer and one
more towards the original's rows), onnxruntime's buffers for a run of the probe's batch, the
layer inputs a statistics run returns, the cut cache, the calibration samples and the graph's
copies. Recovery sizes itself to the memory available when it starts, and the layer-latency
timings before the search are batched to hold at most a few hundred MB (:data:`onnxcc.latency.BATCH_BYTES`),
so neither is in the estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis.groups import Analysis
from .search.probe import STAT_RUN_BYTES
from .search.sizing import SENS_SAMPLES
from .search.suffix import CACHE_BYTES

ARENA_SHARE = 0.5  # of every tensor of a run, what onnxruntime's reused buffers hold at once
MODEL_COPIES = 4   # the loaded, normalized and probe graphs, and the sessions' weights
BASE = 400 << 20   # the interpreter with numpy, onnx, onnxruntime (and torch) loaded


@dataclass(frozen=True)
class Footprint:
    parts: dict[str, int]    # what holds memory at the peak -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {_gb(b)}" for name, b in big if b >= 1 << 26)


def _gb(b: float) -> str:
    return f"{b / 2**30:.1f} GB"


def estimate(a: Analysis, model_bytes: int, sample_bytes: int, batch: int) -> Footprint:
    """The search's peak on ``a`` (one sample's shapes). ``sample_bytes``: all calibration
    samples; ``batch``: samples per probe run. Recovery is not in it: it sizes its batch and
    cache to the memory available when it starts."""
    shapes = a.view.shapes
    size = {t: 4 * int(np.prod(s)) for t, s in shapes.items() if s is not None}
    by_output = {n.outputs[0].name: n for n in a.view.nodes if n.outputs}
    layers = [l for l in a.layers if l.compressible and l.key in by_output]
    inputs = sum(size.get(t, 0) for t in {by_output[l.key].inputs[0].name for l in layers})
    columns = [(l.cin // max(l.group, 1)) * l.kk + 1 for l in layers]
    return Footprint({"the graph's copies": MODEL_COPIES * model_bytes, "calibration samples": 2 * sample_bytes,
                      "the interpreter": BASE,
                      "layer statistics": 2 * 4 * sum(c * c for c in columns),
                      "statistics runs": 2 * max(inputs, min(STAT_RUN_BYTES, batch * inputs)),
                      "onnxruntime buffers": int(ARENA_SHARE * batch * sum(size.values())),
                      "the cut cache": min(CACHE_BYTES, SENS_SAMPLES * inputs)})
