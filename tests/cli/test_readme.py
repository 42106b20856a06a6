"""The README's set-up commands stay true: its main job runs, and CI runs its test command."""
import shlex
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from oracles import check_model_full

ROOT = Path(__file__).resolve().parents[2]


def _setup_lines() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [lines[i + 1] for i, l in enumerate(lines) if l.startswith("# 1.") or l.startswith("# 2.")]


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path):
    first = _setup_lines()[0]
    job = first[first.index("onnxcc compress"):]
    args = shlex.split(job)[1:]
    out = tmp_path / "out.onnx"
    args[args.index("-o") + 1] = str(out)
    r = subprocess.run([sys.executable, "-m", "onnxcc", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    check_model_full(onnx.load(out))


def test_ci_runs_the_readme_test_command():
    test_cmd = _setup_lines()[1].split("&&", 1)[1].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
