"""compress --resume: a run killed in the middle of its search continues from the steps it
measured and ends with the model an uninterrupted run writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from processes import kill_when_written

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ARGS = ["--flops", "0.5", "--steps", "3", "--tries", "1", "--recover", "none", "--no-latency-model"]


def _compress(out: Path, *extra: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "onnxcc", "compress", str(EXAMPLES / "animal_cnn.onnx"), "--calib",
           str(EXAMPLES / "animal_calib.npy"), *ARGS, "-o", str(out), *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_writes_what_an_uninterrupted_run_writes(tmp_path):
    whole = _compress(tmp_path / "whole.onnx")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed.onnx"
    run = _compress(out, wait=False)
    first = Path(str(out) + ".search") / "try1-step1.npz"
    kill_when_written(run, first)
    assert first.is_file() and not out.exists()
    assert not (first.parent / "try1-step3.npz").exists()      # killed in the middle of the search
    resumed = _compress(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = onnx.load(tmp_path / "whole.onnx"), onnx.load(out)
    assert a.graph.SerializeToString() == b.graph.SerializeToString()
    assert not first.parent.exists()                          # the checkpoint goes once the output is written


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    out = tmp_path / "m.onnx"
    r = _compress(out, "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    folder = Path(str(out) + ".search")
    folder.mkdir()
    (folder / "run.json").write_text('{"fingerprint": "another run", "measured": {}}')
    r = _compress(out, "--resume")
    assert r.returncode == 2 and "another model" in r.stderr and not out.exists()


def test_checkpointed_steps_read_back_exactly(tmp_path):
    from onnxcc.resume import SearchCheckpoint
    from onnxcc.search import Plan

    ckpt = SearchCheckpoint(tmp_path / "c", "key")
    plan = Plan({3: np.array([True, False, True])}, {"conv1": 4})
    weights = {"W": np.arange(6, dtype=np.float32).reshape(2, 3)}
    curves = {"group 3": {"saved_fraction": np.array([0.1, 0.2]), "damage": [np.float64(0.5), 0.25]}}
    ckpt.steps_of(1).save_step(1, plan, curves, weights)
    assert ckpt.measured("round_to", lambda: 16) == 16
    again = SearchCheckpoint(tmp_path / "c", "key", resume=True)
    assert again.measured("round_to", lambda: 32) == 16               # the killed run's measurement
    steps = again.steps_of(1)
    got_plan, got_curves, got_weights = steps.step(1)
    assert got_plan.ranks == plan.ranks and np.array_equal(got_plan.keep[3], plan.keep[3])
    assert np.array_equal(got_weights["W"], weights["W"]) and got_curves["group 3"]["damage"] == [0.5, 0.25]
    assert steps.step(2) is None and steps.seconds() >= 0
