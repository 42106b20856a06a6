"""The peak memory estimated before a run starts, and the refusal where the machine cannot hold it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from graphs import GRAPHS
from engine_helpers import normalized_analysis

from onnxcc import footprint, memory
from onnxcc.calib import Calibration
from onnxcc.cli import main
from onnxcc.compression import compress
from onnxcc.errors import ResourceError


def _calib(n: int = 24) -> Calibration:
    return Calibration({"x": np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)}, "test")


def test_the_estimate_grows_with_the_samples_and_the_batch():
    model = GRAPHS["tiny_resnet"](13)
    _, a = normalized_analysis(model)
    one = footprint.estimate(a, model.ByteSize(), 1 << 20, 1)
    assert {"layer statistics", "onnxruntime buffers", "calibration samples"} <= set(one.parts)
    assert footprint.estimate(a, model.ByteSize(), 2 << 20, 1).total == one.total + (2 << 20)
    assert footprint.estimate(a, model.ByteSize(), 1 << 20, 8).total > one.total
    # a layer's statistics: float32 moments of its (columns + 1) per row, towards the original's too
    columns = [(l.cin // l.group) * l.kk + 1 for l in a.layers if l.compressible]
    assert one.parts["layer statistics"] == 8 * sum(c * c for c in columns)


def test_recovery_sizes_its_budgets_to_the_memory_available(monkeypatch):
    from onnxcc.recover import pipeline

    monkeypatch.setattr(pipeline, "available_bytes", lambda: 4 << 30)
    assert pipeline.memory_budgets() == (1 << 30, 1 << 30)
    monkeypatch.setattr(pipeline, "available_bytes", lambda: 64 << 30)
    assert pipeline.memory_budgets() == (pipeline.TRAIN_MEMORY, pipeline.CACHE_MEMORY)


def test_a_run_that_cannot_fit_is_refused_before_it_measures(monkeypatch):
    messages = []
    monkeypatch.setattr("onnxcc.compression.available_bytes", lambda: 1 << 20)
    with pytest.raises(ResourceError, match=r"would need about .* GB at its peak .* are available") as e:
        compress(GRAPHS["tiny_resnet"](13), 0.3, calib=_calib(), recover="none", latency_aware=False,
                 progress=lambda m, d, t: messages.append(m))
    assert "\n" not in str(e.value) and not any("measuring" in m and "step" in m for m in messages)
    # told to try anyway, it runs, and the report holds the estimate beside the measured peak
    res = compress(GRAPHS["tiny_resnet"](13), 0.3, calib=_calib(), recover="none", latency_aware=False,
                   memory_check=False)
    assert res.report["memory"]["estimated_gb"] > 0 and res.report["memory"]["peak_rss_gb"] > 0


def test_the_command_line_refuses_in_one_line_with_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    src, calib, out = tmp_path / "m.onnx", tmp_path / "c.npy", tmp_path / "out.onnx"
    onnx.save(GRAPHS["tiny_resnet"](13), src)
    np.save(calib, _calib().samples["x"])
    monkeypatch.setattr("onnxcc.compression.available_bytes", lambda: 1 << 20)
    with pytest.raises(SystemExit) as e:
        main(["compress", str(src), "--flops", "0.3", "--calib", str(calib), "--recover", "none",
              "--no-latency-model", "-o", str(out)])
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and "--skip-memory-check" in err[0], err
    assert not out.exists() and not out.with_name(out.name + ".report").exists()


def test_available_memory_is_read_on_linux():
    free = memory.available_bytes()
    assert free is None or free > 0
