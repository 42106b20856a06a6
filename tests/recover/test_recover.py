"""Post-training recovery: exact where nothing was removed, structure untouched, error lowered."""
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import GRAPHS
from oracles import check_model_full, run

from onnxcc.calib import Calibration
from onnxcc.compression import compress
from onnxcc.passes.normalize import normalize
from onnxcc.recover import Kept, read_channel_map, recover, with_channel_map
from onnxcc.recover.blocks import partition
from onnxcc.recover.judge import OutputJudge
from onnxcc.recover.pipeline import _activations, comparable, structure
from onnxcc.recover.shared import sample_free


def _samples(model: onnx.ModelProto, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim][1:]
    return {vi.name: np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def _batch_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    for o in model.graph.output:
        o.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def test_channel_map_round_trips_through_metadata():
    cmap = {"a": Kept(1, np.array([0, 1, 2, 5, 7, 8, 9])), "b/c:0": Kept(3, np.array([4]))}
    model = with_channel_map(onnx.ModelProto(), cmap)
    back = read_channel_map(with_channel_map(model, cmap))   # written twice: one entry
    assert len(model.metadata_props) == 1
    assert {k: (v.axis, v.index.tolist()) for k, v in back.items()} == {k: (v.axis, v.index.tolist()) for k, v in cmap.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_mobilenet", "runtime_anchors"])
@pytest.mark.parametrize("mode", ["stats", "blocks"])
def test_nothing_removed_leaves_outputs_unchanged(mode, name):
    model = normalize(_batch_dynamic(GRAPHS[name](13))).model
    feeds = _samples(model, 24)
    res = recover(model, model, feeds, mode=mode, seconds=5)
    assert structure(res.model) == structure(model)
    for a, b in zip(run(model, {k: v[:4] for k, v in feeds.items()}), run(res.model, {k: v[:4] for k, v in feeds.items()})):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_statistics_correction_restores_a_shifted_bias():
    """A layer whose output drifted by a per-channel offset (what removed channels leave behind on
    average) is moved back exactly by the mean correction."""
    teacher = normalize(_batch_dynamic(GRAPHS["tiny_resnet"](13))).model
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    conv = next(n for n in student.graph.node if n.op_type == "Conv" and len(n.input) > 2)
    init = next(i for i in student.graph.initializer if i.name == conv.input[2])
    b = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(b + np.linspace(-1, 1, b.size).astype(b.dtype), init.name))
    feeds = _samples(teacher, 32)
    res = recover(student, teacher, feeds, mode="stats")
    d = res.record["damage"]
    assert res.record["statistics"]["mode"] in ("mean", "affine")
    assert d["statistics"] < 1e-6 < d["cut"]
    assert structure(res.model) == structure(student)


def test_samples_recovery_never_saw_choose_the_stage_written():
    teacher, student, data = _compressed("tiny_resnet", 0.5, 32)
    unseen = _samples(teacher, 12, seed=5)
    res = recover(student, teacher, data.samples, mode="stats", choose_on=unseen)
    chosen = res.record["choice_damage"]
    assert set(chosen) == set(res.stages) == {"cut", "statistics"}
    assert chosen["cut"] == pytest.approx(OutputJudge(normalize(teacher).model, unseen).damage(student))
    assert res.record["kept"] == min(chosen, key=chosen.get) and res.record["choice_samples"] == 12
    assert res.model is res.stages[res.record["kept"]]


def _compressed(name: str, flops: float, n: int):
    """``name`` cut by plain removal (no least-squares refit) down to a quarter of a group's
    channels, so that there is much to give back."""
    model = _batch_dynamic(GRAPHS[name](13))
    data = Calibration(_samples(model, n), "random test samples")
    res = compress(model, flops, calib=data, steps=1, round_to=1, recover="none", latency_aware=False,
                   reconstruct=False, min_keep=0.25)
    return model, res.model, data


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet"])
def test_blocks_lower_the_error_on_samples_recovery_never_saw(name):
    teacher, student, data = _compressed(name, 0.5, 64)
    assert read_channel_map(student), "compress writes which channels each narrowed tensor kept"
    res = recover(student, teacher, data.samples, mode="blocks", seconds=20)
    check_model_full(res.model)
    assert structure(res.model) == structure(student)
    unseen = OutputJudge(normalize(teacher).model, _samples(teacher, 32, seed=99))
    before, after = unseen.damage(student), unseen.damage(res.model)
    assert res.record["kept"] != "cut"
    assert after < 0.5 * before, (before, after, res.record["damage"])
    batch = {k: v[:5] for k, v in _samples(teacher, 5, seed=3).items()}
    single = np.concatenate([run(res.model, {k: v[i:i + 1] for k, v in batch.items()})[0] for i in range(5)])
    np.testing.assert_allclose(run(res.model, batch)[0], single, rtol=1e-4, atol=1e-5)


def test_targets_kept_in_files_read_back_any_samples_as_computed(tmp_path):
    import torch

    from onnxcc.recover.judge import run_outputs
    from onnxcc.recover.train import _Targets

    model = normalize(_batch_dynamic(GRAPHS["tiny_resnet"](13))).model
    feeds = _samples(model, 70)
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv"][:2] + [model.graph.output[0].name]
    targets = _Targets(model, names, feeds, {}, tmp_path, "cpu")
    ref = run_outputs(model, names, feeds)
    idx = np.array([69, 3, 40, 0])
    for got, want in zip(targets.batch(tuple(names), idx, torch.device("cpu")), ref):
        np.testing.assert_array_equal(got.numpy(), want[np.sort(idx)])
    for name, want in zip(names, ref):
        assert targets.scale[name] == pytest.approx(np.var(want[:64].astype(np.float64)), rel=1e-9)


def test_tensors_without_a_sample_axis_are_fed_for_the_batch_at_hand():
    """YOLOv8-style exports compute anchors and reshape targets ([N, C, -1]) from shapes at run
    time, alive across the head: statistics segments and blocks are fed them for the size of each
    batch, never concatenated over batches (which raised on the scalars among them)."""
    teacher, student, data = _compressed("runtime_anchors", 0.5, 48)
    free = sample_free(student)
    one = {k: v[:1] for k, v in data.samples.items()}
    s_vals, t_vals = _activations(student, one), _activations(normalize(teacher).model, one)
    floats = {k for k, v in s_vals.items() if v.dtype.kind == "f"} - free
    blocks = partition(student, floats, comparable(s_vals, t_vals, read_channel_map(student)) - free)
    assert any(free & set(b.inputs) for b in blocks[1:]), "a later block reads a shape-made tensor"
    res = recover(student, teacher, data.samples, mode="blocks", seconds=8, choose_on=_samples(teacher, 12, seed=7))
    assert structure(res.model) == structure(student)
    assert {"statistics", "blocks", "end-to-end"} <= set(res.stages)
    unseen = OutputJudge(normalize(teacher).model, _samples(teacher, 32, seed=99))
    assert unseen.damage(res.model) < unseen.damage(student)
    batch = _samples(teacher, 5, seed=3)
    single = np.concatenate([run(res.model, {k: v[i:i + 1] for k, v in batch.items()})[0] for i in range(5)])
    np.testing.assert_allclose(run(res.model, batch)[0], single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_few_samples_stop_training_before_its_time_is_up(monkeypatch):
    """Past MAX_EPOCHS passes over the same samples training stops, however much time is left:
    16 samples do not take the whole of a generous budget."""
    from onnxcc.recover import train

    monkeypatch.setattr(train, "MAX_EPOCHS", 10)
    teacher, student, data = _compressed("tiny_resnet", 0.5, 16)
    res = recover(student, teacher, data.samples, mode="blocks", seconds=600)
    rec = res.record
    views = rec["train_samples"] * rec["views"]
    assert [b["steps"] for b in rec["blocks"]] == [math.ceil(10 * views / rec["batch"])] * len(rec["blocks"])
    assert rec["end_to_end"]["steps"] == math.ceil(10 * rec["train_samples"] / rec["batch"])
    assert structure(res.model) == structure(student)


def test_blocks_cover_the_graph_and_end_at_joins():
    teacher, student, data = _compressed("tiny_resnet", 0.3, 16)
    one = {k: v[:1] for k, v in data.samples.items()}
    s_vals, t_vals = _activations(student, one), _activations(normalize(teacher).model, one)
    same = comparable(s_vals, t_vals, read_channel_map(student))
    blocks = partition(student, {k for k, v in s_vals.items() if v.dtype.kind == "f"}, same)
    assert blocks[0].start == 0 and blocks[-1].end == len(student.graph.node)
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    assert len(blocks) > 1
    ops = {o: n.op_type for n in student.graph.node for o in n.output}
    # a residual block's output is its join (Add, then Relu): no cut inside a block with a live skip
    assert all(len(b.live) == 1 for b in blocks[:-1])
    assert sum(b.layers for b in blocks) == sum(ops[o] in ("Conv", "Gemm") for o in ops)


@pytest.mark.slow
def test_cli_recover_writes_a_better_model_and_refuses_bad_input(tmp_path):
    teacher, student, data = _compressed("tiny_resnet", 0.5, 64)
    paths = {k: tmp_path / f"{k}.onnx" for k in ("teacher", "student")}
    onnx.save(teacher, paths["teacher"])
    onnx.save(student, paths["student"])
    np.save(tmp_path / "x.npy", next(iter(data.samples.values())))
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "onnxcc", "recover", str(paths["student"]), "--teacher", str(paths["teacher"]),
           "--calib", str(tmp_path / "x.npy"), "-o", str(out), "--recover-time", "10"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "after the cut" in r.stdout
    check_model_full(onnx.load(out))
    bad = subprocess.run(cmd[:-4] + ["-o", str(tmp_path / "o2.onnx"), "--calib", str(tmp_path / "missing.npy")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o2.onnx").exists()
    np.save(tmp_path / "few.npy", next(iter(data.samples.values()))[:6])
    few = subprocess.run(cmd[:-4] + ["-o", str(tmp_path / "o3.onnx"), "--calib", str(tmp_path / "few.npy")],
                         capture_output=True, text=True, timeout=120)
    assert few.returncode == 2 and "more samples" in few.stderr and len(few.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o3.onnx").exists()


def test_an_op_the_torch_executor_lacks_leaves_the_statistics_stage_with_a_reason():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("LRN", ["h"], ["e"], size=3),
         helper.make_node("Conv", ["e", "w2"], ["y"])], "lrn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    res = recover(model, model, _samples(model, 16), mode="blocks", seconds=5)
    assert res.record["mode"] == "stats" and "LRN" in res.record["why_stats_only"]
    assert "blocks" not in res.stages
