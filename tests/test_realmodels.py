"""Real architectures: the onnx wheel's structure models and the fetched corpus (PyTorch,
Paddle-style Constant weights, tf2onnx NHWC). Every check is exact, not approximate."""
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnx as _onnx
from conftest import require_data
from engine_helpers import random_keep, zero_reads
from oracles import assert_same_outputs, check_model_full, random_feeds, runtime_macs

from onnxcc.inspect import inspect_model
from onnxcc.passes.factorize import FactorizeConvPass
from onnxcc.passes.prune import PruneChannelsPass

LIGHT_DIR = Path(_onnx.__file__).parent / "backend/test/data/light"
LIGHT = sorted(LIGHT_DIR.glob("*.onnx"))
pytestmark = pytest.mark.slow   # minutes of real models: the full suite (CI) runs them

HEAVY = {"light_vgg19", "light_zfnet512", "light_bvlc_alexnet"}  # >500 MB of FC weights
# Grouped convs everywhere (ShuffleNet) or grouped convs + LRN (AlexNet): little to compress.
LOW_COMPRESSIBLE = {"light_shufflenet", "light_bvlc_alexnet"}
CORPUS = ["mobilenetv2", "open_nsfw", "yolo_like", "dbnet_like", "tf_style_mobilenet",
          "paddle_style_resnet", "paddle_style_dbnet", "efficientnet_lite0"]


def _check_engine(model: onnx.ModelProto, expect_compressible: bool):
    feeds = random_feeds(model)
    ins = inspect_model(model, feeds=feeds)
    a = ins.analysis
    assert a.total_macs == runtime_macs(model, feeds)
    assert_same_outputs(model, ins.model, feeds, rtol=1e-4, atol=1e-4)
    if expect_compressible:
        assert a.compressible_macs >= 0.8 * a.total_macs
    keep = random_keep(a, seed=0, frac=0.7)
    pruned = PruneChannelsPass(a, keep)(ins.model)
    check_model_full(pruned.model)
    assert_same_outputs(zero_reads(a, ins.model, keep), pruned.model, feeds, rtol=1e-4, atol=1e-4)
    assert runtime_macs(pruned.model, feeds) == pruned.record.macs_after
    if expect_compressible:
        assert pruned.record.macs_after < a.total_macs
    return ins


def _param(path: Path):
    marks = [pytest.mark.slow] if path.stem in HEAVY else []
    return pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.realmodel
@pytest.mark.parametrize("path", [_param(p) for p in LIGHT])
def test_onnx_light_models(path):
    _check_engine(onnx.load(str(path)), path.stem not in LOW_COMPRESSIBLE)


@pytest.mark.realmodel
@pytest.mark.parametrize("name", CORPUS)
def test_corpus_models(name):
    require_data(name)
    import models

    _check_engine_and_full_rank(onnx.load(str(models.model_path(name))))


def _check_engine_and_full_rank(model: onnx.ModelProto) -> None:
    """:func:`_check_engine`, then factorizing every Conv at full rank reproduces the model."""
    ins = _check_engine(model, True)
    a = ins.analysis
    full = {l.key: min(l.cout, l.cin * l.kk) for l in a.layers if l.factorizable}
    fact = FactorizeConvPass(full)(ins.model)
    check_model_full(fact.model)
    assert_same_outputs(ins.model, fact.model, random_feeds(model), rtol=1e-3, atol=1e-4)


def _dynamo_export(name: str, path: Path, dynamic_batch: bool) -> onnx.ModelProto:
    """The default export of current PyTorch (torch.export + onnxscript, opset 18+): BN folded
    into the Convs, adaptive pooling as ReduceMean with axes as an input."""
    import warnings

    import torch

    import models.dbnet_like
    import models.mobilenetv2
    import models.variants
    from models.common import randomize_bn

    build, size = {"mobilenetv2": (models.mobilenetv2.build, 224), "dbnet_like": (models.dbnet_like.build, 256),
                   "paddle_resnet": (models.variants.build_paddle_resnet, 224)}[name]
    net = randomize_bn(build(seed=3)).eval()
    shapes = ({0: torch.export.Dim("N")},) if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, size, size),), str(path), dynamo=True, dynamic_shapes=shapes)
    return onnx.load(str(path))


@pytest.mark.parametrize("name,dynamic_batch", [("mobilenetv2", False), ("mobilenetv2", True),
                                                ("dbnet_like", False), ("paddle_resnet", False)])
def test_torch_dynamo_exports(name, dynamic_batch, tmp_path):
    """What a user of current PyTorch gets from ``torch.onnx.export``: the engine is exact on it
    (normalisation, zeroed-read pruning, full-rank factorization, MACs as onnxruntime runs them)."""
    model = _dynamo_export(name, tmp_path / "m.onnx", dynamic_batch)
    assert model.opset_import[0].version >= 18
    _check_engine_and_full_rank(model)


@pytest.mark.slow
def test_cli_compress_dynamo_export_lands_on_target(tmp_path):
    """`onnxcc compress` on a dynamic-batch torch.export model: valid, within one point."""
    import numpy as np

    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npy"
    _dynamo_export("mobilenetv2", src, dynamic_batch=True)
    np.save(calib, np.random.default_rng(0).standard_normal((24, 3, 224, 224), np.float32))
    _cli_compress_lands_on_target(src, calib, tmp_path / "out.onnx")


@pytest.mark.realmodel
def test_open_nsfw_nhwc_is_fully_prunable():
    require_data("open_nsfw")
    import models

    ins = inspect_model(str(models.model_path("open_nsfw")))
    a = ins.analysis
    assert ins.input_shapes == {"input:0": (1, 224, 224, 3)}
    assert len([l for l in a.layers if l.op == "Conv"]) == 53
    assert a.total_macs == 1_068_550_144
    # every conv of the residual network reads or writes a prunable group
    assert all(l.prunable for l in a.layers if l.op == "Conv")


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["yolo_like", "dbnet_like", "tf_style_mobilenet", "paddle_style_resnet",
                                  "paddle_style_dbnet"])
def test_cli_compress_corpus_model_lands_on_target(name, tmp_path):
    """As a user would: `onnxcc compress --flops 0.3 --calib X.npy` on each export style gives a
    valid model within one point of the target (MACs counted from onnxruntime's shapes)."""
    require_data(name)
    import models

    _cli_compress_lands_on_target(models.model_path(name), models.calib_path(name), tmp_path / "out.onnx")


def _cli_compress_lands_on_target(src: Path, calib: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "onnxcc", "compress", str(src), "--flops", "0.3",
                        "--calib", str(calib), "-o", str(out), "--threads", "2", "--recover-time", "20"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    original, compressed = onnx.load(str(src)), onnx.load(str(out))
    check_model_full(compressed)
    feeds = random_feeds(original)
    assert abs(1 - runtime_macs(compressed, feeds) / runtime_macs(original, feeds) - 0.3) <= 0.01


@pytest.mark.slow
@pytest.mark.realmodel
def test_flops_plan_does_not_follow_the_machines_load(monkeypatch):
    """The whole-model timing that calibrates the latency model varies with load (4.3 vs 7.1 ms
    for MobileNetV2 in one session); under --flops the plan must not follow it."""
    require_data("mobilenetv2")
    import models
    import numpy as np

    from onnxcc.compression import compress
    from onnxcc.latency_model import LatencyModel

    calibrate = LatencyModel.calibrate
    plans = []
    for load in (1.0, 4.0):
        monkeypatch.setattr(LatencyModel, "calibrate", lambda self, s, k=load: calibrate(self, s * k))
        res = compress(str(models.model_path("mobilenetv2")), 0.3, calib=str(models.calib_path("mobilenetv2")),
                       steps=2, threads=2, tries=1, recover="none")   # one search shows it; more only take longer
        plans.append(({g: np.flatnonzero(m).tolist() for g, m in res.plan.keep.items()}, res.plan.ranks))
    assert plans[0] == plans[1]
