"""Fine-tuning at the scale of real data sets: image folders read as used, any sample source,
augmentation drawn per sample and epoch, DistributedDataParallel under torchrun (gloo on CPU),
checkpoints and a killed run that resumes to the weights of one that never stopped."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from graphs import GRAPHS
from oracles import check_model_full, run
from processes import kill_when_written
from test_finetune import _perturbed, _two_inputs

from onnxcc.calib import ImagePreprocess, load_image
from onnxcc.errors import CalibrationError
from onnxcc.finetuning import finetune, finetune_verified, load_npz, open_samples
from onnxcc.passes.normalize import normalize

torch = pytest.importorskip("torch")
F32 = np.float32
REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).parents[1] / "helpers" / "ddp_rank.py"


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _dynamic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    for vi in (*model.graph.input, *model.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


def _pair(tmp_path: Path, n: int = 32, seed: int = 0) -> tuple[Path, Path, Path]:
    """An exported-style teacher (BatchNorm folded, dynamic batch), a perturbed student, inputs."""
    teacher = _dynamic_batch(normalize(GRAPHS["tiny_resnet"](13)).model)
    onnx.save(teacher, tmp_path / "teacher.onnx")
    onnx.save(_perturbed(teacher), tmp_path / "student.onnx")
    np.save(tmp_path / "x.npy", np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(F32))
    return tmp_path / "student.onnx", tmp_path / "teacher.onnx", tmp_path / "x.npy"


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "onnxcc", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, **kw)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# =============================================================================== the data
def _image_folder(root: Path, classes: dict[str, int], size=(20, 24), seed=0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, count in classes.items():
        d = root / cls if cls else root
        d.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"{k:03d}.png")


def test_an_image_folder_is_read_lazily_with_class_labels(tmp_path):
    _image_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    model = GRAPHS["tiny_resnet"](13)
    pp = ImagePreprocess(size=(16, 16))
    samples = open_samples(tmp_path / "train", model, pp)
    assert len(samples) == 5 and samples.labeled and samples.classes == ["cat", "dog"]
    x, y = samples.sample(4)
    assert y == 1 and x["x"].shape == (3, 16, 16)
    np.testing.assert_array_equal(x["x"], load_image(tmp_path / "train" / "dog" / "001.png", pp))
    _image_folder(tmp_path / "flat", {"": 2})
    flat = open_samples(tmp_path / "flat", model, pp)
    assert not flat.labeled and flat.sample(1)[1] == -1
    _image_folder(tmp_path / "flat" / "odd", {"": 1})
    with pytest.raises(CalibrationError, match="both directly in the folder and in class sub-folders"):
        open_samples(tmp_path / "flat", model, pp)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        open_samples(tmp_path / "empty", model, pp)


def test_center_crop_one_reads_the_whole_image(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    pp = ImagePreprocess(size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1), scale=1.0, crop=1.0)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", pp), img.transpose(2, 0, 1).astype(F32))


def test_a_two_input_model_reads_a_folder_per_input(tmp_path):
    model = _two_inputs()
    for name in ("a", "b"):
        _image_folder(tmp_path / name, {"": 3}, size=(8, 8), seed=ord(name))
    samples = open_samples(tmp_path, model, ImagePreprocess(size=(8, 8)))
    assert len(samples) == 3 and set(samples.sample(0)[0]) == {"a", "b"}
    (tmp_path / "b" / "002.png").unlink()
    with pytest.raises(CalibrationError, match="hold different files"):
        open_samples(tmp_path, model, ImagePreprocess(size=(8, 8)))


def test_npz_members_are_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(F32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6))
    data = load_npz(tmp_path / "d.npz")
    assert isinstance(data["x"], np.memmap)
    np.testing.assert_array_equal(data["x"], x)
    from onnxcc.finetuning.data import ArraySamples

    rows = ArraySamples({"x": data["x"]}, data["y"])
    assert all(np.array_equal(rows.sample(i)[0]["x"], x[i]) and rows.sample(i)[1] == i for i in range(6))
    np.savez_compressed(tmp_path / "c.npz", x=x)   # compressed members cannot be mapped: read
    np.testing.assert_array_equal(load_npz(tmp_path / "c.npz")["x"], x)


def test_augmentation_depends_on_sample_and_epoch_only(tmp_path):
    import pickle

    from onnxcc.finetuning.data import TrainSet, as_samples

    model = GRAPHS["tiny_resnet"](13)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(F32))
    data = TrainSet(as_samples(tmp_path / "x.npy", model, "train"), model, "train", augment=True, seed=5)
    assert data.images == {"x"}
    a, b = data[(2, 1)][0]["x"], data[(2, 1)][0]["x"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data[(2, 2)][0]["x"]) and not np.array_equal(a, data[(3, 1)][0]["x"])
    copy = pickle.loads(pickle.dumps(data))   # as a spawned worker gets it: the memory map travels as its file
    assert isinstance(copy.samples.x["x"], np.memmap)
    np.testing.assert_array_equal(copy[(2, 1)][0]["x"], a)
    plain = TrainSet(as_samples(tmp_path / "x.npy", model, "train"), model, "train", augment=False)
    np.testing.assert_array_equal(plain[(2, 1)][0]["x"], np.load(tmp_path / "x.npy")[2])


def test_bad_samples_say_which(tmp_path):
    model = GRAPHS["tiny_resnet"](13)
    x = np.zeros((3, 3, 16, 16), F32)
    x[1, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="train data: 'x' holds NaN or Inf"):
        finetune(model, model, {"x": x}, batch_size=1, augment=False)
    with pytest.raises(CalibrationError, match="train sample 1 holds NaN or Inf"):   # a dataset: as it is read
        finetune(model, model, list(torch.from_numpy(x)), batch_size=1, augment=False)
    with pytest.raises(CalibrationError, match=r"class indices in \[0, 10\); the data has 21 classes"):
        finetune(model, model, {"x": x[[0, 0, 0]], "y": np.array([0, 1, 20])})


def test_fine_tunes_from_an_image_folder_with_workers_and_from_a_torch_dataset(tmp_path):
    teacher = GRAPHS["tiny_resnet"](13)
    student = _perturbed(teacher)
    _image_folder(tmp_path / "imgs", {"": 24}, size=(16, 16))
    pp = ImagePreprocess(size=(16, 16), crop=1.0)
    tuned, history = finetune_verified(student, teacher, tmp_path / "imgs", tmp_path / "imgs", epochs=2, lr=3e-3,
                                       batch_size=8, workers=1, preprocess=pp)
    assert history["workers"] == 1 and history["augmented"] == ["x"] and history["train_samples"] == 24
    assert history["epochs"][-1]["val_loss"] < history["initial"]["val_loss"]
    check_model_full(tuned)

    class Pairs(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i]}

    tuned, history = finetune(student, teacher, Pairs(), Pairs(), epochs=1, lr=3e-3, batch_size=8)
    assert history["epochs"][0]["val_loss"] < history["initial"]["val_loss"]


def test_warmup_then_cosine():
    from onnxcc.finetuning.loop import schedule

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = schedule(opt, total=10, warmup=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


# ==================================================================== devices and processes
def _torchrun(nproc: int, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], capture_output=True, text=True, timeout=600, env=env or _env())


@pytest.mark.slow
@pytest.mark.parametrize("batchnorm", [True, False])
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, batchnorm):
    """2 ranks (gloo), 4 samples each per step: both hold identical weights, and they equal one
    process stepping on the 8 samples together — augmentation included (drawn per sample), and
    re-inserted BatchNorm (statistics of the global batch)."""
    student, teacher, data = _pair(tmp_path)
    r = _torchrun(2, str(HELPER), str(student), str(teacher), str(data), str(tmp_path), str(int(batchnorm)))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{k}.npz")) for k in (0, 1)]
    single, history = finetune(onnx.load(student), onnx.load(teacher), data, epochs=2, lr=3e-3, batch_size=8, seed=3,
                               batchnorm=batchnorm)
    assert history["world_size"] == 1
    moved = 0
    for name, want in _weights(single).items():
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)
        # gradients (and BatchNorm's sums) are added in another order across two processes, and
        # Adam's normalised steps carry the rounding on: float tolerance after 8 steps
        np.testing.assert_allclose(ranks[0][name], want, rtol=2e-3, atol=1e-4, err_msg=name)
        moved += not np.array_equal(want, _weights(onnx.load(student))[name])
    assert moved > 0


@pytest.mark.slow
def test_torchrun_cli_writes_once(tmp_path):
    student, teacher, data = _pair(tmp_path)
    r = _torchrun(2, "-m", "onnxcc", "finetune", str(student), "--teacher", str(teacher), "--data", str(data),
                  "-o", str(tmp_path / "ddp.onnx"), "--epochs", "1", "--batch-size", "8", "--lr", "3e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1 and r.stdout.count("epoch 1/1: train loss") == 1
    s = _cli("finetune", student, "--teacher", teacher, "--data", data, "-o", tmp_path / "one.onnx",
             "--epochs", "1", "--batch-size", "8", "--lr", "3e-3", env=_env())
    assert s.returncode == 0, s.stderr
    one, ddp = _weights(onnx.load(tmp_path / "one.onnx")), _weights(onnx.load(tmp_path / "ddp.onnx"))
    for name in one:
        np.testing.assert_allclose(ddp[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert not (tmp_path / "ddp.onnx.ckpt").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    student, teacher, data = _pair(tmp_path, n=384)
    args = ["finetune", student, "--teacher", teacher, "--data", data, "--epochs", "4", "--batch-size", "8",
            "--lr", "3e-3", "--val", data]
    full = _cli(*args, "-o", tmp_path / "full.onnx", env=_env())
    assert full.returncode == 0, full.stderr
    assert full.stdout.count("val loss") == 4   # one line per epoch, without a terminal too

    out = tmp_path / "killed.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxcc", *map(str, args), "-o", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = Path(str(out) + ".ckpt") / "last.pt"
    kill_when_written(proc, ckpt)
    assert ckpt.exists() and not out.exists(), "the run ended before it could be killed"
    epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= epoch < 4

    bad = _cli(*[a if a != "4" else "5" for a in args], "-o", out, "--resume", env=_env())
    assert bad.returncode == 2 and "another model, data or settings" in bad.stderr
    resumed = _cli(*args, "-o", out, "--resume", env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint of epoch" in resumed.stderr
    got, want = _weights(onnx.load(out)), _weights(onnx.load(tmp_path / "full.onnx"))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not ckpt.parent.exists()


@pytest.mark.slow
def test_reinserted_batchnorm_is_the_identity_at_start_and_folds_back_exactly():
    from onnxcc.finetuning import batchnorm
    from onnxcc.finetuning.executor import OnnxModule, export_weights

    model = normalize(GRAPHS["tiny_resnet"](13)).model   # BatchNorm folded into Convs with biases, as exported
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(F32))
    module = OnnxModule(model)
    want = module({"x": x})[0].detach()
    assert batchnorm.insert(module, [{"x": x}]) >= 2
    module.eval()
    torch.testing.assert_close(module({"x": x})[0], want, rtol=1e-4, atol=1e-4)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(3):   # move the BatchNorm's affine and running statistics away from the identity
        opt.zero_grad()
        module({"x": x})[0].square().mean().backward()
        opt.step()
    module.eval()
    trained = module({"x": x})[0].detach()
    batchnorm.fold(module)
    assert not module.after
    torch.testing.assert_close(module({"x": x})[0], trained, rtol=1e-4, atol=1e-4)
    exported = export_weights(module, model)
    np.testing.assert_allclose(run(exported, {"x": x[:1].numpy()})[0], trained[:1].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_fine_tunes_with_batchnorm(tmp_path):
    student, teacher, data = _pair(tmp_path, n=48)
    tuned, history = finetune_verified(onnx.load(student), onnx.load(teacher), data, data, epochs=2, lr=3e-3,
                                       batch_size=16, augment=False, batchnorm=True)
    assert history["batchnorm_inserted"] >= 2
    assert history["epochs"][-1]["val_loss"] < history["initial"]["val_loss"]
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in onnx.load(student).graph.node]


@pytest.mark.slow
def test_fine_tunes_from_the_callers_batches():
    """A DataLoader (or any re-iterable of batches with a length) is used as it comes."""
    teacher = _dynamic_batch(normalize(GRAPHS["tiny_resnet"](13)).model)
    student = _perturbed(teacher)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(F32))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8,
                                         collate_fn=lambda rows: {"x": torch.stack([r[0] for r in rows])})
    tuned, history = finetune_verified(student, teacher, loader, loader, epochs=3, lr=1e-3, batch_size=8)
    assert history["train_batches"] == 4 and history["augmented"] == []
    assert history["epochs"][-1]["val_loss"] < history["initial"]["val_loss"]
    with pytest.raises(CalibrationError, match="need a length"):
        finetune(student, teacher, iter([{"x": x[:8]}]))


def test_a_val_folder_numbers_its_classes_as_the_train_folder_does(tmp_path):
    _image_folder(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1})
    _image_folder(tmp_path / "val", {"ant": 1, "cat": 1})
    model, pp = GRAPHS["tiny_resnet"](13), ImagePreprocess(size=(16, 16))
    train = open_samples(tmp_path / "train", model, pp)
    val = open_samples(tmp_path / "val", model, pp, "val", classes=train.classes)
    assert [val.sample(i)[1] for i in range(2)] == [0, 2]
    _image_folder(tmp_path / "val", {"dog": 1})
    with pytest.raises(CalibrationError, match="not classes of the training data"):
        open_samples(tmp_path / "val", model, pp, "val", classes=train.classes)


def test_one_channel_inputs_read_grey_images(tmp_path):
    _image_folder(tmp_path, {"": 1}, size=(16, 16))
    pp = ImagePreprocess(size=(16, 16), mean=(0.5,), std=(0.25,), crop=1.0)
    x = load_image(tmp_path / "000.png", pp, grey=True)
    assert x.shape == (1, 16, 16)
    with pytest.raises(CalibrationError, match="center-crop"):
        ImagePreprocess(crop=0)
