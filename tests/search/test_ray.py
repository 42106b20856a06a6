"""Measurement on a local Ray cluster (2 worker processes, CPU): the same damages, and the same
plan, as in this process."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphs import GRAPHS

ray = pytest.importorskip("ray", reason="pip install 'onnxcc[ray]'")

pytestmark = pytest.mark.slow     # starting Ray takes seconds


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _probe(model: onnx.ModelProto, n: int = 24):
    from onnxcc.inspect import inspect_model
    from onnxcc.search import WeightProbe

    ins = inspect_model(model, {"x": (1, 3, 16, 16)})
    x = np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)
    return ins, WeightProbe(ins.analysis, ins.model, {"x": x}, threads=1)


def test_ray_workers_measure_what_this_process_measures(local_ray):
    _, probe = _probe(GRAPHS["tiny_resnet"](13))
    rng = np.random.default_rng(1)
    changes = []
    for key, v in probe.views.items():       # each layer's weight perturbed alone
        w = probe.original[v.weight]
        changes.append(({key}, lambda w=w, name=v.weight: {name: w * rng.uniform(0.5, 1.5, w.shape).astype(w.dtype)}))
    frozen = [(keys, (lambda d=build(): d)) for keys, build in changes]   # the same values for both runs
    here = probe.damages({}, frozen)
    probe.on_ray("auto", 2)
    try:
        ticks = []
        there = probe.damages({}, frozen, lambda: ticks.append(1))
    finally:
        probe.close()
    assert len(ticks) == len(frozen) and max(here) > 0
    np.testing.assert_allclose(there, here, rtol=1e-6)


def test_compress_on_ray_gives_the_plan_of_this_process(local_ray):
    from onnxcc.calib import Calibration
    from onnxcc.compression import compress

    model = GRAPHS["tiny_resnet"](13)
    x = np.random.default_rng(0).standard_normal((64, 3, 16, 16)).astype(np.float32)
    kw = dict(calib=Calibration({"x": x}, "test"), steps=2, tries=1, round_to=1, recover="none", threads=1,
              latency_aware=False)
    here = compress(model, 0.4, **kw)
    there = compress(model, 0.4, ray_address="auto", ray_workers=2, **kw)
    assert here.plan.ranks == there.plan.ranks
    assert here.plan.keep.keys() == there.plan.keep.keys()
    assert all(np.array_equal(here.plan.keep[g], there.plan.keep[g]) for g in here.plan.keep)
    assert here.model.graph.SerializeToString() == there.model.graph.SerializeToString()
