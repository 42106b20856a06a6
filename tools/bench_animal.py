#!/usr/bin/env python
"""Accuracy benchmark on Animal-MNIST: onnxcc versus Torch-Pruning at the same MACs and fine-tuning budget.

    python tools/bench_animal.py [--flops 0.5 0.7] [--epochs 4] [--tp-onnx-finetune] [--fresh] [--quick]
    python tools/bench_animal.py --recovery [--fresh]   # post-training recovery only, no labels, no fine-tuning

``--recovery``: the baseline compressed by onnxcc cc at 50% and 70% fewer MACs with its default
post-training recovery, calibrated on 256 unlabeled train images drawn at random; test accuracy
after the cut and after each recovery stage, no fine-tuning. Writes
tools/results/animal_recovery.{json,md}.

Data: the animal-mnist 0.4 wheel's 10000 28x28 grey images (10 classes), fetched by
``python tools/fetch_data.py``. Exact duplicate images are removed (and images whose copies carry
different labels dropped); the train/val/test split is by image content and committed in
``tools/data/animal_mnist_split.json`` (sha1 prefixes of the image bytes), so it never depends on
file order. Input: 28->64 bilinear, grey->3 channels, ImageNet mean/std, NCHW float32.

Baseline: MobileNetV2 with its ImageNet weights and a new 10-class head, fine-tuned in torch,
exported to ONNX (BatchNorm fused, as users export). Then --flops of its MACs are removed by
* onnxcc ``compress`` with --method cc, prune and decompose (on the ONNX graph), and
* Torch-Pruning 1.6.1 (on the torch model), L1 magnitude and Taylor importance, with its own
  benchmark recipe: BasePruner, global pruning, pruning_ratio 1.0 spread over 400 iterative steps,
  stepping until the MAC target is met (Taylor gradients re-accumulated before every step),
  round_to=8 and the classifier ignored, as its README recommends; then exported to ONNX.
onnxcc's models are fine-tuned as a user would, through the CLI: ``onnxcc finetune`` reading the
train and val splits from an image folder (class sub-folders, 64x64 PNGs written once to the cache:
the network's input before normalisation). Every compressed model gets the same budget
(distillation from the baseline + cross-entropy, same epochs/lr/batch/seed, best val epoch kept).
At the last --flops target (of several) onnxcc cc alone is compressed, and also fine-tuned with
other recipes (without augmentation; with BatchNorm re-inserted): the rows that tell training
recipes apart.
That code trains the exported graph, whose BatchNorm is fused into the Convs; a pruned network
that was not refit can lose its signal there (activations far off the BN statistics), so each
Torch-Pruning model is fine-tuned by the same loss, optimiser and schedule in torch with its
BatchNorm layers training on batch statistics, its usual workflow ("torch fine-tuning" rows;
``--tp-onnx-finetune`` adds rows that fine-tune its exported graph through onnxcc's CLI).

Measured on the test split (never used for any choice): accuracy right after compression and
after fine-tuning; MACs (Conv/Gemm/MatMul from onnxruntime's runtime shapes, the same counter for
every model); params (initializer elements); latency (onnxruntime CPU, 2 threads, batch 1,
interleaved rounds via ``onnxcc.benchmark.benchmark``). Writes tools/results/animal_mnist.{json,md}.
Expensive stages are cached under ``<data dir>/bench_animal/`` keyed by their settings;
``--fresh`` recomputes everything. ``--quick`` is a small smoke run (results go to the cache dir).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

import models  # noqa: E402
from bench_compress import cpu_model, runtime_macs, session  # noqa: E402
from models.mobilenetv2 import build, export_onnx  # noqa: E402

import onnxcc  # noqa: E402
from onnxcc.benchmark import benchmark  # noqa: E402
from onnxcc.calib import Calibration  # noqa: E402
from onnxcc.compression import compress  # noqa: E402
from onnxcc.finetuning.train import history_path  # noqa: E402

SPLIT_FILE = REPO / "tools" / "data" / "animal_mnist_split.json"
PREFIX = 10          # hex digits of sha1 kept per image in the split file (40 bits: checked unique)
SIZE = 64            # input resolution fed to the network
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
THREADS = 2
console = Console()


def sgd_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> float:
    """One optimisation step of ``loss``; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


# ===================================================================================== data
def image_keys(images: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def deduplicate(images: np.ndarray, labels: np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
    """First index of every distinct image whose copies all share one label; counts for the report."""
    first: dict[str, int] = {}
    seen_labels: dict[str, set[int]] = defaultdict(set)
    for i, k in enumerate(image_keys(images)):
        first.setdefault(k, i)
        seen_labels[k].add(int(labels[i]))
    conflicting = {k for k, ls in seen_labels.items() if len(ls) > 1}
    keep = {k: i for k, i in first.items() if k not in conflicting}
    stats = {"images": len(images), "distinct": len(first), "duplicates_removed": len(images) - len(first),
             "conflicting_label_images_dropped": len(conflicting), "kept": len(keep)}
    return keep, stats


def make_split(keys: list[str]) -> dict[str, list[str]]:
    """20% test, 10% val, 70% train, decided by the image's own sha1 (stable under reordering)."""
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k in sorted(keys):
        bucket = int(k[:8], 16) % 10
        split["test" if bucket < 2 else "val" if bucket == 2 else "train"].append(k[:PREFIX])
    return split


def load_split(keep: dict[str, int]) -> dict[str, np.ndarray]:
    """Indices per split from the committed file (written from the data once if it is missing)."""
    if not SPLIT_FILE.is_file():
        split = make_split(list(keep))
        SPLIT_FILE.parent.mkdir(parents=True, exist_ok=True)
        doc = {"dataset": "animal-mnist==0.4 (animal_data/label_version_3), deduplicated",
               "key": f"first {PREFIX} hex digits of sha1 over the 28x28 uint8 image bytes",
               "rule": "int(sha1[:8], 16) % 10: 0-1 test, 2 val, 3-9 train", **split}
        # one split per line keeps the file small and its diffs readable
        SPLIT_FILE.write_text("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc.items()) + "\n}\n")
        console.print(f"wrote the split to {SPLIT_FILE.relative_to(REPO)}")
    doc = json.loads(SPLIT_FILE.read_text())
    by_prefix = {k[:PREFIX]: i for k, i in keep.items()}
    if len(by_prefix) != len(keep):
        raise SystemExit("sha1 prefixes collide; raise PREFIX and regenerate the split")
    out = {}
    for name in ("train", "val", "test"):
        missing = [p for p in doc[name] if p not in by_prefix]
        if missing:
            raise SystemExit(f"{len(missing)} {name} images of {SPLIT_FILE.name} are not in the data "
                             f"(different animal-mnist version?)")
        out[name] = np.array(sorted(by_prefix[p] for p in doc[name]), dtype=np.int64)
    return out


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 3, 64, 64): bilinear resize, grey to RGB, ImageNet normalisation."""
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).numpy().astype(np.float32)


def pixels(x: np.ndarray) -> np.ndarray:
    """Normalised NCHW floats back to the uint8 HWC images they were made from."""
    mean, std = np.asarray(MEAN).reshape(1, 3, 1, 1), np.asarray(STD).reshape(1, 3, 1, 1)
    return np.clip(np.rint((x * std + mean) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_folders(cache: Path, data: dict) -> dict[str, Path]:
    """The train and val splits as class folders of 64x64 PNGs, written once (what onnxcc finetune reads)."""
    from PIL import Image

    root = cache / f"folders-{key_of('folders', SIZE, {k: len(v[1]) for k, v in data.items()})}"
    if not (root / "done").is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for split in ("train", "val"):
            x, y = data[split]
            for k, (im, label) in enumerate(zip(pixels(x), y)):
                folder = tmp / split / f"{label:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(im).save(folder / f"{k:05d}.png")
        (tmp / "done").write_text("")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        console.print(f"wrote the train and val images to {root}")
    return {split: root / split for split in ("train", "val")}


def split_images() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, int]]:
    """The raw images and labels, the indices of each split, and the deduplication counts."""
    root = models.data_dir() / "animal_mnist"
    if not (root / "images.npy").is_file():
        raise SystemExit(f"{root}/images.npy missing: run python tools/fetch_data.py first")
    images, labels = np.load(root / "images.npy"), np.load(root / "labels.npy")
    keep, stats = deduplicate(images, labels)
    return images, labels, load_split(keep), stats


def load_data(limit: int | None) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    images, labels, idx, stats = split_images()
    if limit:  # --quick: a seeded subset of each split
        rng = np.random.default_rng(0)
        idx = {k: np.sort(rng.choice(v, min(len(v), limit if k == "train" else limit // 2), replace=False))
               for k, v in idx.items()}
    data = {k: (preprocess(images[v]), labels[v].astype(np.int64)) for k, v in idx.items()}
    stats["split"] = {k: len(v) for k, v in idx.items()}
    stats["class_counts"] = {k: np.bincount(labels[v], minlength=10).tolist() for k, v in idx.items()}
    return data, stats


# ================================================================================== helpers
def key_of(*parts: Any) -> str:
    """Cache key: the settings a stage depends on (and the split file's content)."""
    blob = json.dumps([hashlib.sha1(SPLIT_FILE.read_bytes()).hexdigest(), *parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def onnxcc_source() -> str:
    """Fingerprint of the onnxcc package's code: a changed compressor or fine-tuner invalidates the cache."""
    h = hashlib.sha1()
    for f in sorted((REPO / "onnxcc").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode() + f.read_bytes())
    return h.hexdigest()[:12]


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    s = session(model)
    name = s.get_inputs()[0].name
    pred = np.concatenate([s.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))


def to_onnx(model: torch.nn.Module, path: Path) -> onnx.ModelProto:
    export_onnx(copy.deepcopy(model).eval(), path, opset=13, input_size=SIZE)
    return onnx.load(str(path))


# ================================================================================= baseline
def mobilenet(num_classes: int = 10) -> torch.nn.Module:
    """MobileNetV2 with torchvision's ImageNet weights and a fresh, seeded 10-class head."""
    model = build(models.data_dir() / "mobilenet_v2-b0353104.pth", seed=0)
    torch.manual_seed(0)
    model.classifier[1] = torch.nn.Linear(model.last_channel, num_classes)
    return model


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 4 px (edge padding): cheap and label-preserving."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=gen))
    return F.pad(x, (4, 4, 4, 4), mode="replicate")[:, :, dy:dy + SIZE, dx:dx + SIZE]


def train_baseline(data: dict, epochs: int, lr: float, batch: int) -> tuple[torch.nn.Module, list[dict]]:
    """Plain torch fine-tuning of the whole network: SGD + momentum, cosine schedule, best val epoch kept."""
    model = mobilenet()
    xtr, ytr = torch.from_numpy(data["train"][0]), torch.from_numpy(data["train"][1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    steps = (len(xtr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(0)
    best, history = (-1.0, None), []
    with progress_bar() as bar:
        task = bar.add_task("baseline fine-tuning", total=epochs * steps)
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(xtr), generator=gen)
            total = 0.0
            for i in range(0, len(xtr), batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(model(augment(xtr[idx], gen)), ytr[idx])
                total += sgd_step(loss, opt, sched) * len(idx)
                bar.update(task, advance=1, description=f"baseline epoch {epoch}/{epochs}")
            model.eval()
            val = torch_accuracy(model, *data["val"])
            history.append({"epoch": epoch, "train_loss": total / len(xtr), "val_acc": val})
            console.print(f"  baseline epoch {epoch}: loss {total / len(xtr):.4f}, val acc {val:.4f}")
            if val > best[0]:
                best = (val, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[1])
    return model.eval(), history


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    pred = torch.cat([model(torch.from_numpy(x[i:i + batch])).argmax(1) for i in range(0, len(x), batch)])
    return float((pred.numpy() == y).mean())


# ============================================================================ torch-pruning
def torch_macs(model: torch.nn.Module) -> int:
    """Conv2d/Linear MACs at batch 1 from forward hooks: the ONNX counter's rule (BN is fused on export)."""
    total = 0

    def hook(m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        spatial = int(np.prod(out.shape[2:])) if isinstance(m, torch.nn.Conv2d) else int(np.prod(out.shape[:-1]))
        total += m.weight.numel() * spatial

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, SIZE, SIZE))
    for h in handles:
        h.remove()
    return total


def tp_prune(base: torch.nn.Module, criterion: str, target: float, data: dict, grad_batches: int,
             grad_batch: int) -> tuple[torch.nn.Module, dict]:
    """Torch-Pruning's progressive recipe: small global steps until ``target`` of the MACs is gone."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    imp = tp.importance.MagnitudeImportance(p=1) if criterion == "l1" else tp.importance.TaylorImportance()
    pruner = tp.pruner.BasePruner(model, torch.zeros(1, 3, SIZE, SIZE), importance=imp, global_pruning=True,
                                  pruning_ratio=1.0, iterative_steps=400, round_to=8,
                                  ignored_layers=[model.classifier[1]])
    x, y = torch.from_numpy(data["train"][0]), torch.from_numpy(data["train"][1])
    gen = torch.Generator().manual_seed(0)
    macs0, macs, steps = torch_macs(model), torch_macs(model), 0
    with progress_bar() as bar:
        task = bar.add_task(f"Torch-Pruning {criterion}", total=round(target * 1000))
        while 1 - macs / macs0 < target and pruner.current_step < pruner.iterative_steps:
            if criterion == "taylor":  # first-order Taylor needs fresh gradients of the current model
                model.zero_grad()
                for _ in range(grad_batches):
                    idx = torch.randint(0, len(x), (grad_batch,), generator=gen)
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
            pruner.step()
            macs, steps = torch_macs(model), steps + 1
            bar.update(task, completed=min(round(target * 1000), round((1 - macs / macs0) * 1000)))
    model.zero_grad(set_to_none=True)
    return model, {"pruner_steps": steps, "torch_mac_reduction": round(1 - macs / macs0, 4)}


def finetune_torch(model: torch.nn.Module, teacher: onnx.ModelProto, data: dict, budget: dict, label: str,
                   temperature: float = 4.0, alpha: float = 0.5) -> tuple[torch.nn.Module, dict]:
    """onnxcc's fine-tuning loop re-done in torch, for the torch model Torch-Pruning returns.

    Same loss (alpha * KL at T * T^2 + (1 - alpha) * CE against the baseline's logits), Adam, cosine
    schedule per step, batch order from ``np.random.default_rng(0)``, best val epoch kept (0 = untouched).
    The one difference is the point of the row: BatchNorm layers still exist and train on batch
    statistics, as in Torch-Pruning's own workflow. Dropout stays off, as in the exported graph.
    """
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    s = session(teacher)
    name = s.get_inputs()[0].name
    soft = torch.from_numpy(np.concatenate([s.run(None, {name: xtr[i:i + 256]})[0] for i in range(0, len(xtr), 256)]))
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    batch, epochs = budget["batch_size"], budget["epochs"]
    opt = torch.optim.Adam(model.parameters(), lr=budget["lr"])
    steps = (len(xtr) + batch - 1) // batch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    rng = np.random.default_rng(0)
    best = (torch_accuracy(model.eval(), xva, yva), copy.deepcopy(model.state_dict()), 0)
    history: dict[str, Any] = {"epochs": [], "initial": {"val_acc": best[0]}}
    with progress_bar() as bar:
        task = bar.add_task(label, total=epochs * steps)
        for epoch in range(1, epochs + 1):
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.eval()
            total = 0.0
            order = rng.permutation(len(xtr))
            for i in range(0, len(order), batch):
                idx = torch.from_numpy(order[i:i + batch])
                out = model(x[idx])
                kd = F.kl_div(F.log_softmax(out / temperature, 1), F.log_softmax(soft[idx] / temperature, 1),
                              reduction="batchmean", log_target=True) * temperature ** 2
                loss = alpha * kd + (1 - alpha) * F.cross_entropy(out, y[idx])
                total += sgd_step(loss, opt, sched) * len(idx)
                bar.update(task, advance=1, description=f"{label}: epoch {epoch}/{epochs}")
            val = torch_accuracy(model.eval(), xva, yva)
            history["epochs"].append({"epoch": epoch, "train_loss": total / len(xtr), "val_acc": val})
            if val > best[0]:
                best = (val, copy.deepcopy(model.state_dict()), epoch)
    model.load_state_dict(best[1])
    history["best_epoch"], history["selected_by"] = best[2], "val_acc"
    return model.eval(), history


# ================================================================================ pipeline
FT_KINDS = {"onnx": "onnxcc finetune on the exported graph (BatchNorm fused)",
            "torch": "same loss, optimiser, schedule and selection in torch, BatchNorm on batch statistics"}


@dataclass
class Entry:
    """One compressed row: how to make the model (cached at the path given) and how it is fine-tuned."""

    label: str
    tag: str
    make: Callable[[Path], tuple[onnx.ModelProto, dict]]
    tune: str = "onnx"
    torch_module: bool = False  # make() also stores the torch module next to the ONNX file (.pt)
    recipe: tuple[str, ...] = ()  # extra `onnxcc finetune` flags (onnx rows)


def compressed(e: Entry, path: Path, fresh: bool) -> tuple[onnx.ModelProto, dict]:
    """The compressed model and its metadata, made (and cached) unless the cache has them."""
    meta, pt = path.with_suffix(".json"), path.with_suffix(".pt")
    if path.is_file() and meta.is_file() and (pt.is_file() or not e.torch_module) and not fresh:
        return onnx.load(str(path)), json.loads(meta.read_text())
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    model, extra = e.make(path)
    extra["compress_seconds"] = round(time.perf_counter() - t0, 1)
    onnxcc.save_model(model, path)
    meta.write_text(json.dumps(extra))
    return model, extra


def fine_tuned(e: Entry, comp_path: Path, path: Path, teacher_path: Path, teacher: onnx.ModelProto, data: dict,
               folders: dict[str, Path], budget: dict, fresh: bool) -> tuple[onnx.ModelProto, dict]:
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and not fresh:
        return onnx.load(str(path)), json.loads(meta.read_text())
    t0 = time.perf_counter()
    if e.tune == "onnx":
        history = cli_finetune(comp_path, teacher_path, folders, path, budget, e.recipe)
        tuned = onnx.load(str(path))
    else:
        module = torch.load(comp_path.with_suffix(".pt"), weights_only=False)  # our own cache file
        module, history = finetune_torch(module, teacher, data, budget, f"fine-tune {e.label}")
        tuned = to_onnx(module, path)
        onnxcc.save_model(tuned, path)
    done = {"finetune_seconds": round(time.perf_counter() - t0, 1), "history": history}
    meta.write_text(json.dumps(done))
    return tuned, done


def cli_finetune(student: Path, teacher: Path, folders: dict[str, Path], out: Path, budget: dict,
                 recipe: tuple[str, ...]) -> dict:
    """``onnxcc finetune`` on the image folders, as a user runs it; returns its history."""
    cmd = [sys.executable, "-m", "onnxcc", "finetune", str(student), "--teacher", str(teacher),
           "--data", str(folders["train"]), "--val", str(folders["val"]), "-o", str(out),
           "--image-size", str(SIZE), str(SIZE), "--center-crop", "1", "--epochs", str(budget["epochs"]),
           "--lr", str(budget["lr"]), "--batch-size", str(budget["batch_size"]), "--optimizer", budget["optimizer"],
           "--device", "cpu", "--seed", "0", *recipe]
    console.print("$ " + " ".join(cmd[1:]), highlight=False, soft_wrap=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    r = subprocess.run(cmd, env=env, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"onnxcc finetune exited with {r.returncode}")
    return json.loads(history_path(out).read_text())["history"]


def compress_onnxcc(baseline: onnx.ModelProto, data: dict, method: str, flops: float,
                    args: argparse.Namespace) -> onnx.ModelProto:
    calib = Calibration({baseline.graph.input[0].name: data["train"][0][:args.calib]},
                        f"{args.calib} Animal-MNIST train images")
    with progress_bar() as bar:
        task = bar.add_task(f"onnxcc {method}", total=1)

        def report(desc: str, done: int, total: int) -> None:
            bar.update(task, description=f"onnxcc {method}: {desc}", completed=done, total=total)

        return compress(baseline, flops, calib=calib, method=method, steps=args.steps, progress=report,
                        recover="none").model


RECOVERY_CALIB = 256
RECOVERY_FLOPS = (0.5, 0.7)


def recovery_rows(baseline: onnx.ModelProto, data: dict, args: argparse.Namespace) -> list[dict]:
    """Test accuracy after the cut and after each recovery stage, calibrated without labels."""
    xtr = data["train"][0]
    pick = np.random.default_rng(0).choice(len(xtr), RECOVERY_CALIB, replace=False)
    calib = Calibration({baseline.graph.input[0].name: xtr[pick]},
                        f"{RECOVERY_CALIB} Animal-MNIST train images drawn at random, no labels")
    rows = []
    for flops in RECOVERY_FLOPS:
        t0 = time.perf_counter()
        res = compress(baseline, flops, calib=calib, steps=args.steps)
        secs = time.perf_counter() - t0
        rec = res.report["recovery"]
        for stage, model in res.stages.items():
            rows.append({"flops": flops, "stage": stage, "kept": stage == rec["kept"],
                         "acc": accuracy(model, *data["test"]), "mac_reduction": res.report["totals"]["mac_reduction"],
                         "compress_seconds": round(secs, 1), "recovery_seconds": rec["seconds"]})
            console.print(rows[-1])
    return rows


def recovery_main(args: argparse.Namespace) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cache = models.data_dir() / "bench_animal" / "full"
    data, data_stats = load_data(None)
    base_cfg = {"epochs": args.base_epochs, "lr": args.base_lr, "batch": args.batch, "quick": False}
    _, baseline, _ = get_baseline(data, args, cache / f"baseline-{key_of('baseline', base_cfg)}")
    base_acc = accuracy(baseline, *data["test"])
    rows = recovery_rows(baseline, data, args)
    out = REPO / "tools" / "results"
    res = {"baseline_test_acc": base_acc, "calibration": f"{RECOVERY_CALIB} train images drawn at random, no labels",
           "test_images": len(data["test"][1]), "machine": machine(), "rows": rows}
    (out / "animal_recovery.json").write_text(json.dumps(res, indent=1))
    md = ["# Animal-MNIST: post-training recovery, no labels, no fine-tuning", "",
          f"MobileNetV2 fine-tuned on Animal-MNIST (test accuracy {base_acc:.2%}), compressed by onnxcc cc with "
          f"its default recovery from {res['calibration']}; accuracy on the {res['test_images']} test images. "
          "**bold** = the model compress wrote.", "",
          "| --flops | MACs removed | after | test accuracy | compress time incl. recovery (s) | recovery (s) |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        b = "**" if r["kept"] else ""
        md.append(f"| {r['flops']} | {r['mac_reduction']:.1%} | {b}{r['stage']}{b} | {r['acc']:.2%} | "
                  f"{r['compress_seconds']} | {r['recovery_seconds']} |")
    (out / "animal_recovery.md").write_text("\n".join(md) + "\n")


def main() -> None:
    args = parse_args()
    if args.recovery:
        return recovery_main(args)
    src = onnxcc_source()  # of the code this process imported (edits during the run do not count)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    cache = models.data_dir() / "bench_animal" / ("quick" if args.quick else "full")
    out_dir = Path(args.out) if args.out else (cache if args.quick else REPO / "tools" / "results")
    data, data_stats = load_data(512 if args.quick else None)
    console.print(f"data: {data_stats['split']} after removing {data_stats['duplicates_removed']} duplicates")
    budget = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch, "optimizer": "adam",
              "loss": "0.5 * KL(teacher || student, T=4) * T^2 + 0.5 * cross-entropy",
              "schedule": "cosine to 0 over all steps", "selection": "best val-accuracy epoch (0 = untouched)"}
    base_cfg = {"epochs": args.base_epochs, "lr": args.base_lr, "batch": args.batch, "quick": args.quick}
    times: dict[str, float] = {}

    # -- baseline ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    base_key = key_of("baseline", base_cfg)
    torch_base, baseline, base_info = get_baseline(data, args, cache / f"baseline-{base_key}")
    times["baseline"] = time.perf_counter() - t0
    xte, yte = data["test"]
    macs0 = runtime_macs(baseline, xte)
    rows = [{"method": "baseline", "macs": macs0, "mac_reduction": 0.0, "params": params(baseline),
             "acc_before_ft": None, "acc_after_ft": accuracy(baseline, xte, yte),
             "val_acc": accuracy(baseline, *data["val"])}]
    tuned_models = [baseline]
    console.print(f"baseline: test acc {rows[0]['acc_after_ft']:.4f}, {macs0 / 1e6:.1f} M MACs")

    # -- compressed models -------------------------------------------------------------------
    folders = image_folders(cache, data)
    base_path = cache / f"baseline-{base_key}.onnx"
    t_models = time.perf_counter()
    for flops in args.flops:
        for e in entries_for(flops, flops == args.flops[-1], torch_base, baseline, data, args):
            code = src if e.tag.startswith("onnxcc") else versions()["torch-pruning"]
            ckey = key_of(e.tag, base_key, flops, args.steps, args.calib, args.taylor_batches, code)
            comp_path = cache / f"{e.tag}-{ckey}.onnx"
            try:
                student, extra = compressed(e, comp_path, args.fresh)
            except Exception as err:  # noqa: BLE001 - one failing method must not cost the other rows
                console.print_exception()
                first = str(err).splitlines()[0] if str(err) else ""
                rows.append({"method": e.label, "target": flops, "error": f"{type(err).__name__}: {first}"})
                tuned_models.append(None)
                continue
            macs = runtime_macs(student, xte)
            row = {"method": e.label, "target": flops, "fine_tuning": FT_KINDS[e.tune], "recipe": list(e.recipe),
                   "macs": macs, "mac_reduction": 1 - macs / macs0, "params": params(student),
                   "acc_before_ft": accuracy(student, xte, yte), **extra}
            ft_key = key_of(ckey, budget, e.tune, e.recipe, src if e.tune == "onnx" else None)
            ft_path = cache / f"{e.tag}-{ckey}-ft-{ft_key}.onnx"
            tuned, done = fine_tuned(e, comp_path, ft_path, base_path, baseline, data, folders, budget, args.fresh)
            row.update(acc_after_ft=accuracy(tuned, xte, yte), val_acc=accuracy(tuned, *data["val"]),
                       finetune_seconds=done["finetune_seconds"], best_epoch=done["history"]["best_epoch"],
                       finetune_history=done["history"])
            console.print(f"{e.label} at {flops}: MACs -{row['mac_reduction']:.1%}, test acc "
                          f"{row['acc_before_ft']:.4f} -> {row['acc_after_ft']:.4f}")
            rows.append(row)
            tuned_models.append(tuned)
    times["compress_and_finetune"] = time.perf_counter() - t_models

    # -- latency -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    timed = [(r, m) for r, m in zip(rows, tuned_models) if m is not None]
    lat = benchmark([m for _, m in timed], threads=THREADS, batch=1, runs=args.runs, per_round=10)
    for (r, _), e in zip(timed, lat["models"]):
        r.update(latency_p50_ms=e["p50_ms"], latency_p90_ms=e["p90_ms"], speedup=e["speedup"])
    times["latency"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    write_results(out_dir, rows, data_stats, budget, base_cfg, base_info, lat, times, args, src)


RECIPES = {"no augmentation": ("--no-augment",), "BatchNorm re-inserted": ("--batchnorm",)}


def entries_for(flops: float, last: bool, torch_base: torch.nn.Module, baseline: onnx.ModelProto, data: dict,
                args: argparse.Namespace) -> list[Entry]:
    """The rows at one target: onnxcc's methods, Torch-Pruning's criteria, and at the last target
    the onnxcc cc model fine-tuned with each other recipe."""
    def ours(m: str) -> Callable[[Path], tuple[onnx.ModelProto, dict]]:
        return lambda path: (compress_onnxcc(baseline, data, m, flops, args), {})

    methods = ("cc", "prune") if not last or len(args.flops) == 1 else ("cc",)
    entries = [Entry(f"onnxcc {m}", f"onnxcc-{m}", ours(m)) for m in methods]
    if last:
        entries += [Entry(f"onnxcc cc, {name}", "onnxcc-cc", ours("cc"), recipe=flags) for name, flags in RECIPES.items()]
    for crit, name in (("l1", "L1"), ("taylor", "Taylor")):
        def make(path: Path, c: str = crit) -> tuple[onnx.ModelProto, dict]:
            return tp_model(torch_base, c, flops, args, data, path)
        if args.tp_onnx_finetune:
            entries.append(Entry(f"Torch-Pruning {name}", f"tp-{crit}", make, torch_module=True))
        entries.append(Entry(f"Torch-Pruning {name}, torch fine-tuning", f"tp-{crit}", make, tune="torch",
                             torch_module=True))
    return entries


def get_baseline(data: dict, args: argparse.Namespace, stem: Path) -> tuple[torch.nn.Module, onnx.ModelProto, dict]:
    """The fine-tuned torch baseline and its ONNX export, from the cache when there."""
    pt, path, meta = stem.with_suffix(".pt"), stem.with_suffix(".onnx"), stem.with_suffix(".json")
    if pt.is_file() and path.is_file() and meta.is_file() and not args.fresh:
        model = mobilenet()
        model.load_state_dict(torch.load(pt, weights_only=True))
        console.print(f"baseline from the cache: {pt}")
        return model.eval(), onnx.load(str(path)), json.loads(meta.read_text())
    t0 = time.perf_counter()
    model, history = train_baseline(data, args.base_epochs, args.base_lr, args.batch)
    info = {"train_seconds": round(time.perf_counter() - t0, 1), "history": history}
    stem.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), pt)
    baseline = to_onnx(model, path)
    meta.write_text(json.dumps(info))
    return model, baseline, info


def tp_model(torch_base: torch.nn.Module, criterion: str, flops: float, args: argparse.Namespace, data: dict,
             path: Path) -> tuple[onnx.ModelProto, dict]:
    """Torch-Pruning's model, exported to ONNX at ``path``; the torch module is kept as ``.pt``."""
    pruned, info = tp_prune(torch_base, criterion, flops, data, args.taylor_batches, args.batch)
    torch.save(pruned, path.with_suffix(".pt"))
    return to_onnx(pruned, path), info


# ================================================================================== results
def summarise(rows: list[dict], flops: float) -> dict:
    """At one target: the best onnxcc row with the default recipe (what a user gets) against the
    baseline and against the best Torch-Pruning row."""
    base = rows[0]["acc_after_ft"]
    ok = [r for r in rows if "acc_after_ft" in r and r.get("target") == flops]
    best_onnxcc = max((r for r in ok if r["method"].startswith("onnxcc") and not r["recipe"]),
                      key=lambda r: r["acc_after_ft"], default=None)
    best_tp = max((r for r in ok if r["method"].startswith("Torch-Pruning")), key=lambda r: r["acc_after_ft"],
                  default=None)
    summary: dict[str, Any] = {}
    if best_onnxcc is not None:
        summary["best_onnxcc"] = best_onnxcc["method"]
        summary["onnxcc_minus_baseline_points"] = round(100 * (best_onnxcc["acc_after_ft"] - base), 2)
        summary["within_0.5_points_of_baseline"] = summary["onnxcc_minus_baseline_points"] >= -0.5
    if best_onnxcc is not None and best_tp is not None:
        summary["best_torch_pruning"] = best_tp["method"]
        summary["onnxcc_minus_torch_pruning_points"] = round(100 * (best_onnxcc["acc_after_ft"] - best_tp["acc_after_ft"]), 2)
        summary["ahead_of_torch_pruning_by_0.5_points"] = summary["onnxcc_minus_torch_pruning_points"] >= 0.5
    return summary


def write_results(out_dir: Path, rows: list[dict], data_stats: dict, budget: dict, base_cfg: dict,
                  base_info: dict, lat: dict, times: dict, args: argparse.Namespace, src: str) -> None:
    summary = {str(f): summarise(rows, f) for f in args.flops}
    result = {
        "benchmark": "Animal-MNIST, MobileNetV2 (ImageNet weights) fine-tuned, 64x64 input",
        "flops_removed_target": args.flops, "onnxcc_steps": args.steps, "calibration_images": args.calib,
        "data": data_stats, "split_file": str(SPLIT_FILE.relative_to(REPO)),
        "baseline_training": {**base_cfg, "optimizer": "SGD momentum 0.9, wd 4e-5, cosine",
                              "augmentation": "random h-flip, +-4 px shift", **base_info},
        "finetune_budget": budget,
        "torch_pruning": {"version": versions()["torch-pruning"],
                          "pruner": "BasePruner(global_pruning=True, pruning_ratio=1.0, iterative_steps=400, "
                                    "round_to=8, ignored_layers=[classifier])",
                          "l1": "MagnitudeImportance(p=1)",
                          "taylor": f"TaylorImportance(), gradients of cross-entropy on {args.taylor_batches} "
                                    f"random train batch(es) of {args.batch} before every step",
                          "fine_tuning": FT_KINDS},
        "mac_counter": "Conv/Gemm/MatMul multiply-accumulates from onnxruntime's runtime shapes, batch 1",
        "latency": {k: v for k, v in lat.items() if k != "models"},
        "summary": summary, "rows": rows,
        # this run's stage times; a cached stage costs only its loading, its own cost is in the rows
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "machine": machine(), "versions": {**versions(), "onnxcc_source_sha1": src}, "quick": args.quick,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "animal_mnist.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (out_dir / "animal_mnist.md").write_text(markdown(result))
    console.print(markdown(result))
    console.print(f"wrote {out_dir / 'animal_mnist.json'} and .md in {times['total']:.0f} s")


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def markdown(res: dict) -> str:
    d, b = res["data"], res["finetune_budget"]
    targets = res["flops_removed_target"]
    md = [f"# Animal-MNIST: MobileNetV2 at {' and '.join(f'{f:.0%}' for f in targets)} fewer MACs, fine-tuned", "",
          f"Deduplicated animal-mnist 0.4 ({d['kept']} distinct images of {d['images']}; "
          f"split by image hash in `{res['split_file']}`: {d['split']['train']} train / {d['split']['val']} val / "
          f"{d['split']['test']} test). Input 64x64, grey→RGB, ImageNet normalisation. "
          "Accuracy on the test split, in %.",
          f"Every compressed model: the same fine-tuning budget ({b['epochs']} epochs, Adam lr {b['lr']}, batch "
          f"{b['batch_size']}; distillation from the baseline + cross-entropy; best val epoch kept). onnxcc's rows "
          "run `onnxcc finetune` on the exported graph (BatchNorm fused into the Convs), reading the train and val "
          "splits from an image folder of PNGs, with its defaults (random resized crops of 75-100% of the image "
          "and flips, 3% warm-up, cosine); rows naming a recipe change that (BatchNorm re-inserted: a BatchNorm "
          "after each Conv while training, on batch statistics, folded back on export). Rows marked *torch fine-tuning* run the same loss, "
          "Adam and cosine schedule in torch on Torch-Pruning's module, whose BatchNorm layers still train on "
          "batch statistics (its usual workflow), on the arrays, without augmentation.",
          "MACs: Conv/Gemm/MatMul from onnxruntime runtime shapes, one counter for all. Latency: onnxruntime CPU, "
          f"2 threads, batch 1, {res['latency']['runs']} interleaved runs per model (p50), all models in one run."]
    for flops in targets:
        md += ["", f"## {flops:.0%} fewer MACs", "",
               "| model | MACs (M) | MACs removed | params (M) | acc after compression | acc after fine-tuning | "
               "latency p50 (ms) | speedup |", "|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if r.get("target", flops) != flops:
                continue
            if "error" in r:
                md.append(f"| {r['method']} | failed: {r['error']} |||||||")
                continue
            md.append(f"| {r['method']} | {r['macs'] / 1e6:.2f} | {r['mac_reduction']:.1%} | {r['params'] / 1e6:.3f} | "
                      f"{pct(r['acc_before_ft'])} | {pct(r['acc_after_ft'])} | {r.get('latency_p50_ms', 0):.3f} | "
                      f"{r.get('speedup', 0):.2f}× |")
        s = res["summary"][str(flops)]
        md.append("")
        if "onnxcc_minus_baseline_points" in s:
            md.append(f"Best onnxcc with the default recipe ({s['best_onnxcc']}) after fine-tuning vs the baseline: "
                      f"{s['onnxcc_minus_baseline_points']:+.2f} points.")
        if "onnxcc_minus_torch_pruning_points" in s:
            md.append(f"Best onnxcc vs best Torch-Pruning ({s['best_torch_pruning']}): "
                      f"{s['onnxcc_minus_torch_pruning_points']:+.2f} points.")
    md.append(f"\nBaseline row: the fine-tuned network itself (no compression). Test split: "
              f"{d['split']['test']} images, so one image is {100 / d['split']['test']:.2f} points. "
              f"Wall time of this run {res['wall_seconds']['total'] / 60:.1f} min on {res['machine']['cpu']} "
              "(stages found in the cache are loaded, not recomputed; `--fresh` recomputes all of them).")
    return "\n".join(md) + "\n"


def machine() -> dict:
    return {"cpu": cpu_model()[0], "cores": os.cpu_count(), "platform": platform.platform(), "torch_threads": THREADS}


def versions() -> dict:
    from importlib.metadata import version

    # the wheel's metadata: torch_pruning.__version__ of the 1.6.1 wheel still says 1.6.0
    dist = {"torch-pruning": version("torch-pruning"), "git": git_state()}
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__, "numpy": np.__version__, "onnxcc": onnxcc.__version__, **dist}


def git_state() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flops", type=float, nargs="+", default=[0.5, 0.7],
                   help="fractions of the MACs to remove, one table each (recipes compared at the last)")
    p.add_argument("--steps", type=int, default=3, help="onnxcc compress steps")
    p.add_argument("--calib", type=int, default=128, help="train images given to onnxcc as calibration")
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of every compressed model")
    p.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate (Adam)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--base-epochs", type=int, default=5, help="baseline training epochs")
    p.add_argument("--base-lr", type=float, default=0.02, help="baseline SGD learning rate")
    p.add_argument("--taylor-batches", type=int, default=1, help="train batches per Taylor importance step")
    p.add_argument("--runs", type=int, default=300, help="latency runs per model")
    p.add_argument("--tp-onnx-finetune", action="store_true",
                   help="also fine-tune the Torch-Pruning models on their exported graph (BatchNorm fused), "
                        "as onnxcc's rows are; by default they train in torch, their usual workflow")
    p.add_argument("--fresh", action="store_true", help="ignore the cache and recompute every stage")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 train images, 1 epoch each")
    p.add_argument("--out", help="output folder (default tools/results, or the cache dir with --quick)")
    p.add_argument("--recovery", action="store_true", help="only the post-training recovery table (no fine-tuning)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.base_epochs, args.runs, args.calib = 1, 1, 30, 64
    return args


if __name__ == "__main__":
    main()
