"""Recover the accuracy of a compressed model by distilling its original into it, on the ONNX graph.

The student is executed by :class:`~onnxcc.finetune.executor.OnnxModule`, so training changes only
the numbers inside its weight tensors: the returned model has the student's exact structure.
Data is read a sample at a time (:mod:`.data`) by a torch DataLoader, optionally in worker
processes; the teacher runs in onnxruntime on each batch as it is used, so memory does not grow
with the data set. Under ``torchrun`` the processes share each global batch (DistributedDataParallel,
:mod:`.distributed`); with a checkpoint folder every epoch is saved and a run resumes where it
stopped (:mod:`.checkpoint`). The loss is in :mod:`.loop`: KL divergence at ``temperature`` on
class scores, MSE on anything else, plus cross-entropy where there are labels.

torch is an optional dependency and is imported lazily.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ..analysis.view import graph_inputs
from ..calib import ImagePreprocess
from ..config import FinetuneConfig
from ..errors import CalibrationError, UsageError, VerificationError
from ..io import atomic_write_text, check_output_path, load_model, save_model
from ..runtime import make_session, providers_for
from .data import ArraySamples, ImageFolder, Samples, TrainSet, as_samples, load_npz
from .heads import Teacher, heads, rows_shape

__all__ = ["finetune", "finetune_verified", "load_npz", "run_finetune_cli", "checkpoint_folder", "history_path"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
EpochReport = Callable[[dict[str, Any]], None]


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError("fine-tuning needs torch: pip install 'onnxcc[torch]'") from None
    return torch


def _fixed_batch(inputs: list[onnx.ValueInfoProto]) -> int | None:
    """The batch size an input is declared with, if any (the graph may bake it into Reshapes)."""
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def _teacher_provider(device: str) -> str:
    if device.startswith("cuda"):
        try:
            providers_for("cuda")
            return "cuda"
        except UsageError:
            log.info("onnxruntime has no CUDA provider: the teacher runs on the CPU")
    return "cpu"


def _device(torch, name: str, local_rank: int) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")
    return f"cuda:{local_rank}" if name == "cuda" else "cpu"


def _check_pair(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    if sorted(i.name for i in graph_inputs(student)) != sorted(i.name for i in graph_inputs(teacher)):
        raise UsageError("student and teacher inputs differ: is the student compressed from this teacher?")
    if [h.axis is None for h in heads(student)] != [h.axis is None for h in heads(teacher)]:
        raise UsageError("student and teacher outputs differ (count or kind): is the student compressed from "
                         "this teacher?")


def _classes(samples: Samples, what: str, teach: Teacher, t_heads: list, label_head: int | None,
             first: dict[str, np.ndarray]) -> int | None:
    """The number of classes labels index (None without labels), checked where the source tells."""
    if not samples.labeled:
        return None
    if label_head is None:
        raise UsageError(f"{what} data has labels but the model has no class-score output")
    n_rows, classes = rows_shape(teach.outputs(first)[label_head].shape, t_heads[label_head])
    per_sample = n_rows / len(next(iter(first.values())))
    if per_sample != 1:
        raise UsageError(f"{what} labels need one class-score row per sample; the model gives {per_sample:g}")
    top = (len(samples.classes) - 1 if isinstance(samples, ImageFolder)
           else int(samples.y.max()) if isinstance(samples, ArraySamples) else None)
    if top is not None and top >= classes:
        raise CalibrationError(f"{what} labels must be {len(samples)} class indices in [0, {classes}); the data "
                               f"has {top + 1} classes")
    return classes


def _first_feed(data: TrainSet, batch: int) -> dict[str, np.ndarray]:
    x, _ = data[(0, 0)]
    return {k: np.repeat(v[None], batch, axis=0) for k, v in x.items()}


def _workers(cfg: FinetuneConfig, samples: Samples) -> int:
    """Decoding images is worth worker processes; arrays (in memory or mapped) are read in place."""
    if cfg.workers is not None:
        return cfg.workers
    return min(4, max(1, (os.cpu_count() or 2) - 1)) if isinstance(samples, ImageFolder) else 0


def history_path(output: str | Path) -> Path:
    """Where ``onnxcc finetune -o OUTPUT`` writes its settings and per-epoch history."""
    return Path(str(output) + ".finetune.json")


def checkpoint_folder(output: str | Path) -> Path:
    """Where ``onnxcc finetune -o OUTPUT`` keeps its checkpoints until OUTPUT is written."""
    return Path(str(output) + ".ckpt")


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, train: Any, val: Any = None,
             config: FinetuneConfig | None = None, *, progress: Progress | None = None,
             on_epoch: EpochReport | None = None, checkpoints: str | Path | None = None, resume: bool = False,
             preprocess: ImagePreprocess | None = None, **settings: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Distil ``teacher`` into ``student``; returns the tuned student and the training history.

    ``train``/``val``: a path (image folder, ``.npy``, ``.npz``; images read with ``preprocess``),
    a dict of arrays (``x`` or one per input name, optional labels ``y``), or a sized, indexable
    dataset (see :mod:`onnxcc.finetune.data`). ``config`` holds the settings; keyword ``settings``
    override its fields (``epochs=4, lr=1e-3``). The kept weights are those of the epoch
    (0 = untouched) with the best validation accuracy, or lowest validation distillation loss
    without labels; without ``val`` the last epoch's. With ``checkpoints`` (a folder) each epoch
    is saved there, and ``resume`` continues from the last one saved.

    History: ``{"epochs": [{"epoch", "train_loss", "lr" (at the epoch's end), "seconds", "val_loss"?,
    "val_acc"?}], "initial": {"val_loss"?, "val_acc"?}, "best_epoch", "selected_by": "val_acc" |
    "val_loss" | "last", "world_size", "train_samples", "augmented": [input names], "resumed_from"?}``.
    """
    torch = _torch()
    from . import checkpoint as ckpt
    from .distributed import join, leave
    from .executor import OnnxModule, export_weights
    from .loop import Distiller, EpochSampler, Student, Shard, loader, schedule

    cfg = replace(config or FinetuneConfig(), **settings)
    cfg.validate()
    _check_pair(student, teacher)
    world = join(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    device = _device(torch, cfg.device, world.local_rank)
    if cfg.batch_size % world.size:
        raise UsageError(f"the batch size {cfg.batch_size} is split across {world.size} processes: make it a "
                         "multiple of that")
    local_batch = cfg.batch_size // world.size
    s_heads, t_heads = heads(student), heads(teacher)
    label_head = next((k for k, h in enumerate(s_heads) if h.axis is not None), None)
    chunk = _fixed_batch(graph_inputs(student)) or local_batch
    teach = Teacher(teacher, t_heads, _fixed_batch(graph_inputs(teacher)) or local_batch, _teacher_provider(device))

    tr_samples = as_samples(train, student, "train", preprocess)
    tr = TrainSet(tr_samples, student, "train", augment=cfg.augment, seed=cfg.seed)
    TrainSet(tr_samples, teacher, "train")
    classes = _classes(tr_samples, "train", teach, t_heads, label_head, _first_feed(tr, chunk))
    va_samples = as_samples(val, student, "val", preprocess) if val is not None else None
    va = TrainSet(va_samples, student, "val") if va_samples is not None else None
    if va_samples is not None:
        classes = _classes(va_samples, "val", teach, t_heads, label_head, _first_feed(va, chunk)) or classes

    net = Student(OnnxModule(student).to(device), [h.tensor for h in s_heads], chunk)
    _check_shapes(torch, net, teach, _first_feed(tr, chunk), device)
    renormed = _renormalise(torch, net, TrainSet(tr_samples, student, "train"), local_batch, device) \
        if cfg.batchnorm else 0
    model = net
    if world.size > 1:
        unused = len(net.module.parameters_for(net.names)) < len(list(net.parameters()))
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[world.local_rank] if device.startswith("cuda") else None, find_unused_parameters=unused)
    amp = cfg.amp and device.startswith("cuda") and torch.cuda.is_bf16_supported()
    d = Distiller(net, model, teach, s_heads, label_head, classes, cfg.temperature, cfg.alpha, device, world, amp)

    sampler = EpochSampler(len(tr), world, cfg.seed)
    workers = _workers(cfg, tr_samples)
    batches = loader(tr, local_batch, sampler, workers)
    val_batches = loader(va, local_batch, Shard(len(va), world), 0) if va is not None else None
    params = list(net.parameters())
    opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
    steps = len(batches)
    total = cfg.epochs * steps
    sched = schedule(opt, total, round(cfg.warmup * total))

    history: dict[str, Any] = {"epochs": [], "initial": {}, "world_size": world.size, "train_samples": len(tr),
                               "augmented": sorted(tr.images), "workers": workers,
                               "batchnorm_inserted": renormed}
    best = None
    start = 1
    store = ckpt.Checkpoints(checkpoints) if checkpoints is not None else None
    fp = ckpt.fingerprint(student, teacher, len(tr), {k: v for k, v in vars(cfg).items()
                                                      if k not in ("device", "workers", "amp")})
    state = store.load(fp) if store is not None and resume else None
    if state is not None:
        d.load(state["params"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, start = state["history"], state["epoch"] + 1
        best = (tuple(state["best"]["score"]), state["best"]["params"], state["best"]["epoch"]) if state["best"] else None
        history["resumed_from"] = state["epoch"]
        log.warning("resuming from the checkpoint of epoch %d/%d in %s", state["epoch"], cfg.epochs, store.folder)
    elif va is not None:
        initial = d.evaluate(val_batches)
        history["initial"] = {f"val_{k}": v for k, v in initial.items()}
        best = (_score(initial), d.state(), 0)

    done = (start - 1) * steps

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress and world.main:
            progress(f"fine-tuning epoch {min(cfg.epochs, 1 + (done - 1) // steps)}/{cfg.epochs}", done, total)

    began = time.monotonic()
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.monotonic()
        net.train()
        sampler.set_epoch(epoch)
        row = {"epoch": epoch, "train_loss": d.train_epoch(batches, opt, sched, on_step),
               "lr": opt.param_groups[0]["lr"]}
        if val_batches is not None:
            metrics = d.evaluate(val_batches)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if _score(metrics) > best[0]:
                best = (_score(metrics), d.state(), epoch)
        row["seconds"] = round(time.monotonic() - t0, 2)
        row["eta_seconds"] = round((time.monotonic() - began) / (epoch - start + 1) * (cfg.epochs - epoch), 1)
        history["epochs"].append(row)
        if store is not None and world.main:
            store.save({"fingerprint": fp, "epoch": epoch, "params": d.state(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "history": history,
                        "best": {"score": list(best[0]), "params": best[1], "epoch": best[2]} if best else None})
        if on_epoch and world.main:
            on_epoch(dict(row, epochs=cfg.epochs))
        log.info("epoch %d/%d: %s", epoch, cfg.epochs, row)
    if best is not None:
        d.load(best[1])
    history["best_epoch"] = best[2] if best is not None else cfg.epochs
    history["selected_by"] = "last" if va is None else ("val_acc" if "acc" in _metric_names(history) else "val_loss")
    leave(world)
    if cfg.batchnorm:
        from .batchnorm import fold

        fold(net.module)
    return export_weights(net.module, student), history


def _renormalise(torch, net, data: TrainSet, batch: int, device: str, samples: int = 256) -> int:
    """BatchNorm after each Conv, measured on up to ``samples`` training samples as given."""
    from .batchnorm import insert

    def batches():
        for i in range(0, min(samples, len(data)), batch):
            rows = [data[(k, 0)][0] for k in range(i, min(i + batch, samples, len(data)))]
            yield {name: torch.from_numpy(np.stack([r[name] for r in rows])).to(device) for name in rows[0]}
    return insert(net.module, batches())


def _metric_names(history: dict[str, Any]) -> set[str]:
    rows = [history["initial"], *history["epochs"]]
    return {k[4:] for r in rows for k in r if k.startswith("val_")}


def _score(metrics: dict[str, float]) -> tuple[float, float]:
    """Higher is better: accuracy first when there are labels, then a low distillation loss."""
    return metrics.get("acc", 0.0), -metrics["loss"]


def _check_shapes(torch, net, teach: Teacher, feeds: dict[str, np.ndarray], device: str) -> None:
    """Fail early, in one line, when the student does not produce the teacher's shapes."""
    with torch.no_grad():
        probe = net({k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
    for p, t, name in zip(probe, teach.outputs(feeds), net.names):
        if tuple(p.shape) != t.shape:
            raise UsageError(f"student tensor {name!r} has shape {tuple(p.shape)}, the teacher's "
                             f"{t.shape}: is the student compressed from this teacher?")


# ==================================================================================== CLI
def _verify(tuned: onnx.ModelProto, student: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """The checker passes and onnxruntime gives finite outputs of the student's shapes."""
    try:
        onnx.checker.check_model(tuned, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise VerificationError(f"fine-tuned model fails the ONNX checker: {reason}") from None
    got, ref = make_session(tuned).run(None, feed), make_session(student).run(None, feed)
    if [o.shape for o in got] != [o.shape for o in ref]:
        raise VerificationError("fine-tuned model's output shapes differ from the input model's")
    if not all(np.isfinite(o).all() for o in got if o.dtype.kind == "f"):
        raise VerificationError("fine-tuned model produces NaN/Inf; try a lower --lr")


def run_finetune_cli(student_path: str | Path, teacher_path: str | Path, data: str | Path, out_path: str | Path,
                     val: str | Path | None = None, config: FinetuneConfig | None = None, *,
                     preprocess: ImagePreprocess | None = None, resume: bool = False,
                     progress: Progress | None = None, on_epoch: EpochReport | None = None) -> dict[str, Any]:
    """Everything ``onnxcc finetune`` does: load, fine-tune (checkpointing each epoch beside the
    output), verify, save atomically, with the settings and history in ``OUTPUT.finetune.json``.
    Under torchrun only the first process writes."""
    out = check_output_path(out_path, [student_path, teacher_path], force=False)
    student, teacher = load_model(student_path), load_model(teacher_path)
    folder = checkpoint_folder(out)
    tuned, history = finetune(student, teacher, data, val, config, progress=progress, on_epoch=on_epoch,
                              checkpoints=folder, resume=resume, preprocess=preprocess)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        _verify(tuned, student, _first_feed(TrainSet(as_samples(data, student, "train", preprocess), student, "train"),
                                            _fixed_batch(graph_inputs(student)) or 1))
        save_model(tuned, out)
        cfg = replace(config or FinetuneConfig())
        atomic_write_text(history_path(out), json.dumps({"settings": vars(cfg), "history": history}, indent=1) + "\n")
        from .checkpoint import Checkpoints

        Checkpoints(folder).clear()
    return {"output": str(out), "history": history, "main": main}


def finetune_verified(student: onnx.ModelProto, teacher: onnx.ModelProto, train: Any, val: Any = None,
                      config: FinetuneConfig | None = None, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """:func:`finetune`, then the full checker and an onnxruntime run of the result."""
    tuned, history = finetune(student, teacher, train, val, config, **options)
    samples = as_samples(train, student, "train", options.get("preprocess"))
    _verify(tuned, student, _first_feed(TrainSet(samples, student, "train"), _fixed_batch(graph_inputs(student)) or 1))
    return tuned, history
