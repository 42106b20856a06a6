"""Recover the accuracy of a compressed model by distilling its original into it, on the ONNX graph.

The student is executed by :class:`~onnxcc.finetuning.executor.OnnxModule`, so training changes only
the numbers inside its weight tensors: the returned model has the student's exact structure.
Data is read a sample at a time (:mod:`.data`) by a torch DataLoader, optionally in worker
processes; the teacher runs in onnxruntime on each batch as it is used, so memory does not grow
with the data set. Under ``torchrun`` the processes share each global batch (DistributedDataParallel,
:mod:`.distributed`); with a checkpoint folder every epoch is saved and a run resumes where it
stopped (:mod:`.checkpoint`). :mod:`.run` puts a run together; the loss is in :mod:`.loop`: KL
divergence at ``temperature`` on class scores, MSE on anything else, plus cross-entropy where
there are labels.

torch is an optional dependency and is imported lazily.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..analysis.view import graph_inputs
from ..calib import ImagePreprocess
from ..config import EpochReport, FinetuneConfig, Progress
from ..errors import UsageError, VerificationError
from ..io import atomic_write_text, check_output_path, load_model, save_model
from ..runtime import make_session
from .data import Batches, TrainSet, as_samples, fixed_batch, is_batches, load_npz
from .heads import heads

__all__ = ["check_trainable", "finetune", "finetune_verified", "load_npz", "run_finetune_cli", "checkpoint_folder",
           "history_path"]


def require_torch():
    try:
        import torch
    except ImportError:
        raise UsageError("fine-tuning needs torch: pip install 'onnxcc[torch]'") from None
    return torch


def check_trainable(model: onnx.ModelProto, *, before_compression: bool = False) -> None:
    """Fail in one line, before any work, where torch is missing or the torch executor cannot run
    an op of ``model``. ``before_compression``: ``model`` is the original of a student yet to be
    made, and only its nodes computed from the graph inputs count, as compression folds the
    others into initializers (the executor checks the student itself again)."""
    require_torch()
    from .executor import check_supported   # registers the executor's ops

    check_supported(_computed(model.graph) if before_compression else model.graph.node)


def _computed(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes that read a graph input, directly or through other nodes (graph order is topological)."""
    consts = {t.name for t in graph.initializer}
    live = {i.name for i in graph.input if i.name not in consts}
    nodes = []
    for n in graph.node:
        if live.intersection(n.input):
            live.update(n.output)
            nodes.append(n)
    return nodes


def _check_pair(student: onnx.ModelProto, teacher: onnx.ModelProto) -> None:
    if sorted(i.name for i in graph_inputs(student)) != sorted(i.name for i in graph_inputs(teacher)):
        raise UsageError("student and teacher inputs differ: is the student compressed from this teacher?")
    if [h.axis is None for h in heads(student)] != [h.axis is None for h in heads(teacher)]:
        raise UsageError("student and teacher outputs differ (count or kind): is the student compressed from "
                         "this teacher?")


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
    a dict of arrays (``x`` or one per input name, optional labels ``y``), a sized, indexable
    dataset, or a DataLoader / re-iterable of batches with a length (see :mod:`onnxcc.finetuning.data`). ``config`` holds the settings; keyword ``settings``
    override its fields (``epochs=4, lr=1e-3``). The kept weights are those of the epoch
    (0 = untouched) with the best validation accuracy, or lowest validation distillation loss
    without labels; without ``val`` the last epoch's. With ``checkpoints`` (a folder) each epoch
    is saved there, and ``resume`` continues from the last one saved.

    History: ``{"epochs": [{"epoch", "train_loss", "lr" (at the epoch's end), "seconds", "val_loss"?,
    "val_acc"?}], "initial": {"val_loss"?, "val_acc"?}, "best_epoch", "selected_by": "val_acc" |
    "val_loss" | "last", "world_size", "rank", "train_samples" (or "train_batches"), "augmented": [input
    names], "workers", "batchnorm_inserted", "resumed_from"?}``.
    """
    torch = require_torch()
    check_trainable(student)   # before the data, the teacher or a process group is touched
    from .checkpoint import Checkpoints
    from .distributed import abandon, join, leave
    from .executor import export_weights
    from .run import Run

    cfg = replace(config or FinetuneConfig(), **settings)
    cfg.validate()
    _check_pair(student, teacher)
    world = join("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        run = Run.build(student, teacher, train, val, cfg, world, preprocess)
        store = Checkpoints(checkpoints) if checkpoints is not None else None
        best, start = run.begin(store if resume else None)
        best = run.train(start, best, store, progress, on_epoch)
        module = run.finish(best)
    except BaseException:
        abandon(world)   # no barrier: the other processes may be waiting in a collective already
        raise
    leave(world)
    return export_weights(module, student), run.history


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
    main = history["rank"] == 0
    if main:
        _verify(tuned, student, _probe(data, student, preprocess))
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
    _verify(tuned, student, _probe(train, student, options.get("preprocess")))
    return tuned, history


def _probe(data: Any, model: onnx.ModelProto, preprocess: ImagePreprocess | None) -> dict[str, np.ndarray]:
    """The first training sample as a batch the model accepts."""
    source = (Batches(data, model, "train") if is_batches(data)
              else TrainSet(as_samples(data, model, "train", preprocess), model, "train"))
    return source.first(fixed_batch(model) or 1)
