import json
import subprocess
import sys

import onnx
import pytest

from graphs import GRAPHS
from oracles import random_feeds, runtime_macs


def onnxcc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxcc", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture
def small_model(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(GRAPHS["tiny_resnet"](13), p)
    return p


def test_info_json(small_model):
    before = small_model.read_bytes()
    r = onnxcc("info", small_model, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    model = onnx.load(small_model)
    assert d["macs"] == runtime_macs(model, random_feeds(model))
    assert 0 < d["compressible_macs"] <= d["macs"]
    assert {"name", "op", "macs", "prunable", "factorizable"} <= set(d["layers"][0])
    assert small_model.read_bytes() == before


def test_info_table(small_model):
    r = onnxcc("info", small_model)
    assert r.returncode == 0, r.stderr
    assert "MACs" in r.stdout and "compressible" in r.stdout


@pytest.mark.parametrize("content,expect", [
    (None, "not found"), (b"", "empty"), (b"\x08\x07garbage-not-onnx" * 10, "not"),
])
def test_info_bad_files_exit_2_one_line(tmp_path, content, expect):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    r = onnxcc("info", p)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr
    assert "Traceback" not in r.stderr


def test_truncated_model_is_a_clean_error(tmp_path, small_model):
    p = tmp_path / "trunc.onnx"
    p.write_bytes(small_model.read_bytes()[: small_model.stat().st_size // 2])
    r = onnxcc("info", p)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("spec", ["1,3,x", "0,3,16,16", "a:b"])
def test_bad_input_shape(small_model, spec):
    r = onnxcc("info", small_model, "--input-shape", spec)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_pinning_a_declared_dim_says_how_to_free_it(small_model):
    r = onnxcc("info", small_model, "--input-shape", "1,3,97,97")   # tiny_resnet declares a fixed size
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot change" in r.stderr and "dynamic axes" in r.stderr


def test_unknown_option_is_one_line(small_model):
    r = onnxcc("info", small_model, "--bogus")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_line_progress_says_how_long_the_stage_has_left(monkeypatch, capsys):
    from onnxcc.cli import render

    now = [100.0]
    monkeypatch.setattr(render.time, "monotonic", lambda: now[0])
    p = render.LineProgress(every=30.0)
    p("step 1/2: measuring", 0, 100)
    now[0] += 60
    p("step 1/2: measuring", 20, 100)          # 20 in 60 s: 80 more take 4 min
    now[0] += 1
    p("step 1/2: measuring", 21, 100)          # within 30 s of the last line: silent
    p("timing", 0, 1)                           # a new stage starts its own clock
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[     0 s] step 1/2: measuring 0/100", "[    60 s] step 1/2: measuring 20/100, ~4 min left",
                     "[    61 s] timing 0/1"]
