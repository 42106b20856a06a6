"""Recover the accuracy of a compressed model by distilling its original into it, on the ONNX graph.

The student is executed by :class:`~onnxcc.finetune.executor.OnnxModule`, so training changes only
the numbers inside its weight tensors: the returned model has the student's exact structure.
The teacher runs in onnxruntime on each batch as it is used, so memory does not grow with the
data set: a ``.npy`` is memory-mapped and only the batches in use are read.

Loss per graph output: KL divergence at ``temperature`` on class scores (the input of a final
Softmax/LogSoftmax, or a 2-D ``(N, classes)`` output), mean squared error on anything else (boxes,
dense maps). With labels ``y`` the loss is ``alpha * distillation + (1 - alpha) * cross-entropy``
on the first class-score output. torch is an optional dependency and is imported lazily.
"""
from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from ..analysis.view import graph_inputs
from ..errors import CalibrationError, UsageError, VerificationError
from ..io import check_output_path, load_model, save_model
from ..runtime import expose_outputs, make_session, providers_for

__all__ = ["finetune", "load_npz", "run_finetune_cli"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
_OPTIMIZERS = ("adam", "sgd")


def _torch():
    try:
        import torch
    except ImportError:
        raise UsageError("fine-tuning needs torch: pip install 'onnxcc[torch]'") from None
    return torch


# ==================================================================================== data
def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read training data: an ``.npz`` with ``x`` (one input) or one array per input name, and
    optional ``y`` (N,) integer labels; or an ``.npy`` of inputs, memory-mapped."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"data file not found: {p}")
    arrays = _read_npy(p) if p.suffix == ".npy" else _read_npz(p)
    feeds = {k: v for k, v in arrays.items() if k != "y"}
    if not feeds:
        raise CalibrationError(f"{p} has no input arrays (found: {', '.join(sorted(arrays)) or 'none'})")
    n = max(len(x) if x.ndim else 0 for x in feeds.values())
    for k, x in feeds.items():
        if x.dtype.kind not in "fiub" or x.ndim < 2 or len(x) == 0 or len(x) != n:
            raise CalibrationError(f"{p}: {k!r} must be a numeric (N, ...) array with N >= 1 like the others, "
                                   f"got {x.dtype} {x.shape}")
        if x.dtype.kind == "f" and not isinstance(x, np.memmap) and not np.isfinite(x).all():
            raise CalibrationError(f"{p}: {k!r} holds NaN or Inf values")
    data = dict(feeds)
    if "y" in arrays:
        y = arrays["y"]
        if y.shape != (n,):
            raise CalibrationError(f"{p}: 'y' must have shape ({n},) to match the inputs, got {y.shape}")
        if y.dtype.kind not in "iu" or (y < 0).any():
            raise CalibrationError(f"{p}: 'y' must hold non-negative integer class indices, got {y.dtype}")
        data["y"] = y.astype(np.int64)
    return data


def _read_npy(p: Path) -> dict[str, np.ndarray]:
    try:
        return {"x": np.load(p, mmap_mode="r", allow_pickle=False)}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"not a readable .npy file: {p} ({str(e).strip().splitlines()[0][:120]})") from None


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CalibrationError(f"expected an .npz archive with arrays 'x' (and 'y'), got a plain array: {p}")
        with loaded:
            return {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"not a readable .npz file: {p} ({reason})") from None


def _input_types(model: onnx.ModelProto) -> dict[str, np.dtype]:
    return {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in graph_inputs(model)}


def _feeds_of(data: Mapping[str, np.ndarray], model: onnx.ModelProto, what: str) -> dict[str, np.ndarray]:
    """The data's input arrays keyed by the model's input names (``x`` names a single input)."""
    inputs = graph_inputs(model)
    if "x" in data and len(inputs) == 1 and inputs[0].name not in data:
        arrays = {inputs[0].name: data["x"]}
    else:
        missing = [i.name for i in inputs if i.name not in data]
        if missing:
            raise CalibrationError(f"{what} data has no array for input(s) {missing} (it has "
                                   f"{sorted(k for k in data if k != 'y')}); name arrays after the inputs")
        arrays = {i.name: data[i.name] for i in inputs}
    return {vi.name: _as_input(np.asarray(arrays[vi.name]), vi, what) for vi in inputs}   # a memory map stays one


def _fixed_batch(inputs: list[onnx.ValueInfoProto]) -> int | None:
    """The batch size an input is declared with, if any (the graph may bake it into Reshapes)."""
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def _as_input(x: np.ndarray, vi: onnx.ValueInfoProto, what: str) -> np.ndarray:
    """``x`` after checking its shape (batch dim excepted); batches are cast as they are read."""
    dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    if len(dims) != x.ndim or any(d > 0 and d != s for d, s in zip(dims[1:], x.shape[1:])):
        want = ", ".join(["N"] + [str(d) if d > 0 else "?" for d in dims[1:]])
        raise CalibrationError(f"{what} data for input {vi.name!r} has shape {x.shape}; it expects ({want})")
    return x


def _batch(feeds: Mapping[str, np.ndarray], idx, types: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """Rows ``idx`` of every input, read (from a memory map too) and cast to the input's type."""
    return {k: np.ascontiguousarray(v[idx], dtype=types[k]) for k, v in feeds.items()}


# ================================================================================== heads
@dataclass(frozen=True)
class _Head:
    """What one graph output is trained on: its class scores (axis set) or its values (MSE)."""

    tensor: str
    axis: int | None
    coerce: bool  # Softmax before opset 13: the classes are all dims from `axis` on


def _heads(model: onnx.ModelProto) -> list[_Head]:
    producers = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    heads = []
    for out in model.graph.output:
        node = producers.get(out.name)
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            heads.append(_Head(node.input[0], attrs.get("axis", 1 if opset < 13 else -1), opset < 13))
        elif len(dims) == 2 and dims[1] != 1:  # (N, classes) scores without a Softmax (a Gemm head)
            heads.append(_Head(out.name, 1, False))
        else:
            heads.append(_Head(out.name, None, False))
    return heads


def _rows_shape(shape: tuple[int, ...], head: _Head) -> tuple[int, int]:
    a = head.axis % len(shape)
    if head.coerce:
        return math.prod(shape[:a]), math.prod(shape[a:])
    return math.prod(shape) // shape[a], shape[a]


def _rows(t, head: _Head):
    """Class scores as (rows, classes), the layout KL divergence and cross-entropy work on."""
    shape = _rows_shape(tuple(t.shape), head)
    return (t if head.coerce else t.movedim(head.axis % t.ndim, -1)).reshape(shape)


# ================================================================================ running
class _Teacher:
    """The original model in onnxruntime, run on each batch as training reaches it."""

    def __init__(self, teacher: onnx.ModelProto, heads: list[_Head], chunk: int, provider: str):
        self.names = [h.tensor for h in heads]
        self.session = make_session(expose_outputs(teacher, self.names), provider)
        self.chunk = chunk

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        parts = [self.session.run(self.names, {k: v[i:i + self.chunk] for k, v in feeds.items()})
                 for i in range(0, n, self.chunk)]
        return [np.concatenate(p) for p in zip(*parts)]


@dataclass
class _Split:
    """One data set: its inputs (in memory or memory-mapped), their types, optional labels."""

    x: dict[str, np.ndarray]
    types: dict[str, np.dtype]
    y: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.x.values())))

    def batch(self, idx) -> dict[str, np.ndarray]:
        return _batch(self.x, idx, self.types)


def _prepare(data: Mapping[str, np.ndarray], what: str, student: onnx.ModelProto, teacher: onnx.ModelProto,
             teach: _Teacher, heads_t: list[_Head], label_head: int | None) -> _Split:
    x = _feeds_of(data, student, what)
    _feeds_of(x, teacher, what)
    split = _Split(x, _input_types(student), None)
    y = data.get("y")
    if y is not None:
        if label_head is None:
            raise UsageError(f"{what} data has labels 'y' but the model has no class-score output")
        first = teach.outputs(split.batch(slice(0, 1)))[label_head]
        rows, classes = _rows_shape(first.shape, heads_t[label_head])
        if rows != 1:
            raise UsageError(f"{what} labels 'y' need one class-score row per sample; the model gives {rows} rows")
        y = np.asarray(y)
        if y.shape != (len(split),) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= classes:
            raise CalibrationError(f"{what} labels 'y' must be {len(split)} class indices in [0, {classes})")
        split.y = y.astype(np.int64)
    return split


def _score(metrics: dict[str, float]) -> tuple[float, float]:
    """Higher is better: accuracy first when there are labels, then a low distillation loss."""
    return metrics.get("acc", 0.0), -metrics["loss"]


class _Distiller:
    """The student module and how it is scored against the teacher's outputs."""

    def __init__(self, torch, module, teacher: _Teacher, heads: list[_Head], label_head: int | None, chunk: int,
                 batch_size: int, temperature: float, alpha: float, device: str):
        self.torch, self.module, self.teacher, self.heads, self.label_head = torch, module, teacher, heads, label_head
        self.names = [h.tensor for h in heads]
        self.chunk, self.batch_size, self.device = chunk, batch_size, device
        self.temperature, self.alpha = temperature, alpha

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> list:
        """Run in slices of the model's fixed batch size (if any): graphs may bake it into Reshapes."""
        xt = {k: self.torch.from_numpy(v).to(self.device) for k, v in feeds.items()}
        n = len(next(iter(feeds.values())))
        parts = [self.module.run({k: v[i:i + self.chunk] for k, v in xt.items()}, self.names)
                 for i in range(0, n, self.chunk)]
        return [self.torch.cat(p) for p in zip(*parts)]

    def distill_loss(self, student: list, teacher: list[np.ndarray]):
        F, T = self.torch.nn.functional, self.temperature
        total = 0.0
        for s, t, head in zip(student, teacher, self.heads):
            t = self.torch.from_numpy(t).to(self.device)
            if head.axis is None:
                total = total + F.mse_loss(s, t)
                continue
            log_p = F.log_softmax(_rows(s, head) / T, dim=1)
            log_q = F.log_softmax(_rows(t, head) / T, dim=1)
            # T^2 keeps the gradient scale independent of the temperature (Hinton et al.)
            total = total + F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * T ** 2
        return total

    def check_shapes(self, split: _Split) -> None:
        """Fail early, in one line, when the student does not produce the teacher's shapes."""
        feeds = split.batch(slice(0, self.chunk))
        with self.torch.no_grad():
            probe = self.outputs(feeds)
        for p, t, name in zip(probe, self.teacher.outputs(feeds), self.names):
            if tuple(p.shape) != t.shape:
                raise UsageError(f"student tensor {name!r} has shape {tuple(p.shape)}, the teacher's "
                                 f"{t.shape}: is the student compressed from this teacher?")

    def train_epoch(self, split: _Split, opt, sched, order: np.ndarray, on_step: Callable[[], None]) -> float:
        total = 0.0
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            feeds = split.batch(idx)
            outs = self.outputs(feeds)
            loss = self.distill_loss(outs, self.teacher.outputs(feeds))
            if split.y is not None:
                head = self.heads[self.label_head]
                ce = self.torch.nn.functional.cross_entropy(
                    _rows(outs[self.label_head], head), self.torch.from_numpy(split.y[idx]).to(self.device))
                loss = self.alpha * loss + (1 - self.alpha) * ce
            if not self.torch.isfinite(loss):
                raise UsageError(f"fine-tuning diverged (loss {float(loss.detach())}); try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            on_step()
        return total / len(order)

    def evaluate(self, split: _Split) -> dict[str, float]:
        loss, correct = 0.0, 0
        with self.torch.no_grad():
            for i in range(0, len(split), self.batch_size):
                feeds = split.batch(slice(i, i + self.batch_size))
                outs = self.outputs(feeds)
                n = len(outs[0])
                loss += float(self.distill_loss(outs, self.teacher.outputs(feeds))) * n
                if split.y is not None:
                    scores = _rows(outs[self.label_head], self.heads[self.label_head])
                    correct += int((scores.argmax(dim=1).cpu().numpy() == split.y[i:i + n]).sum())
        metrics = {"loss": loss / len(split)}
        if split.y is not None:
            metrics["acc"] = correct / len(split)
        return metrics

    def state(self) -> dict[str, Any]:
        return {k: p.detach().clone() for k, p in self.module.onnx_parameters().items()}

    def load(self, state: dict[str, Any]) -> None:
        with self.torch.no_grad():
            for k, p in self.module.onnx_parameters().items():
                p.copy_(state[k])


def _check_args(epochs: int, lr: float, batch_size: int, device: str, optimizer: str, alpha: float,
                temperature: float) -> None:
    if epochs < 1 or batch_size < 1:
        raise UsageError(f"epochs and batch size must be >= 1, got {epochs} and {batch_size}")
    if not lr > 0 or not temperature > 0 or not 0 <= alpha <= 1:
        raise UsageError(f"need lr > 0, temperature > 0 and alpha in [0, 1]; got {lr}, {temperature}, {alpha}")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use auto, cpu or cuda")
    if optimizer not in _OPTIMIZERS:
        raise UsageError(f"unknown optimizer {optimizer!r}; use {' or '.join(_OPTIMIZERS)}")


def _teacher_provider(device: str) -> str:
    if device == "cuda":
        try:
            providers_for("cuda")
            return "cuda"
        except UsageError:
            log.info("onnxruntime has no CUDA provider: the teacher runs on the CPU")
    return "cpu"


def finetune(student: onnx.ModelProto, teacher: onnx.ModelProto, train: Mapping[str, np.ndarray],
             val: Mapping[str, np.ndarray] | None = None, *, epochs: int = 1, lr: float = 1e-4,
             batch_size: int = 32, device: str = "auto", temperature: float = 4.0, alpha: float = 0.5,
             optimizer: str = "adam", progress: Progress | None = None,
             seed: int = 0) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Distil ``teacher`` into ``student``; returns the tuned student and the training history.

    ``train``/``val`` are ``{'x': inputs, 'y': optional labels}`` (see :func:`load_npz`). The kept
    weights are those of the epoch (0 = untouched) with the best validation accuracy, or lowest
    validation distillation loss without labels; without ``val`` the last epoch's. ``seed`` fixes
    the batch order. History: ``{"epochs": [{"epoch", "train_loss", "lr" (at the epoch's end),
    "val_loss"?, "val_acc"?}], "initial": {"val_loss"?, "val_acc"?}, "best_epoch": int,
    "selected_by": "val_acc" | "val_loss" | "last"}``.
    """
    torch = _torch()
    from .executor import OnnxModule, export_weights

    _check_args(epochs, lr, batch_size, device, optimizer, alpha, temperature)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")
    s_ins, t_ins = graph_inputs(student), graph_inputs(teacher)
    if sorted(i.name for i in s_ins) != sorted(i.name for i in t_ins):
        raise UsageError("student and teacher inputs differ: is the student compressed from this teacher?")
    heads_s, heads_t = _heads(student), _heads(teacher)
    if [h.axis is None for h in heads_s] != [h.axis is None for h in heads_t]:
        raise UsageError("student and teacher outputs differ (count or kind): is the student compressed from "
                         "this teacher?")
    label_head = next((k for k, h in enumerate(heads_s) if h.axis is not None), None)
    teach = _Teacher(teacher, heads_t, _fixed_batch(t_ins) or batch_size, _teacher_provider(device))
    tr = _prepare(train, "train", student, teacher, teach, heads_t, label_head)
    va = _prepare(val, "val", student, teacher, teach, heads_t, label_head) if val is not None else None

    d = _Distiller(torch, OnnxModule(student).to(device), teach, heads_s, label_head,
                   _fixed_batch(s_ins) or batch_size, batch_size, temperature, alpha, device)
    d.check_shapes(tr)
    params = list(d.module.parameters())
    opt = torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr, momentum=0.9)
    steps = math.ceil(len(tr) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    rng = np.random.default_rng(seed)
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"fine-tuning epoch {min(epochs, 1 + (done - 1) // steps)}/{epochs}", done, epochs * steps)

    initial = d.evaluate(va) if va is not None else {}
    best = (_score(initial), d.state(), 0) if va is not None else None
    history: dict[str, Any] = {"epochs": [], "initial": {f"val_{k}": v for k, v in initial.items()}}
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, "train_loss": d.train_epoch(tr, opt, sched, rng.permutation(len(tr)), on_step),
               "lr": opt.param_groups[0]["lr"]}
        if va is not None:
            metrics = d.evaluate(va)
            row.update({f"val_{k}": v for k, v in metrics.items()})
            if _score(metrics) > best[0]:
                best = (_score(metrics), d.state(), epoch)
        history["epochs"].append(row)
        log.info("epoch %d/%d: %s", epoch, epochs, row)
    if best is not None:
        d.load(best[1])
    history["best_epoch"] = best[2] if best is not None else epochs
    history["selected_by"] = "last" if va is None else ("val_acc" if va.y is not None else "val_loss")
    return export_weights(d.module, student), history


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


def run_finetune_cli(student_path: str | Path, teacher_path: str | Path, data_path: str | Path,
                     out_path: str | Path, epochs: int = 1, lr: float = 1e-4, batch_size: int = 32,
                     val_path: str | Path | None = None, device: str = "auto",
                     progress: Progress | None = None) -> dict[str, Any]:
    """Everything ``onnxcc finetune`` does: load, fine-tune, verify, save atomically."""
    out = check_output_path(out_path, [student_path, teacher_path], force=False)
    student, teacher = load_model(student_path), load_model(teacher_path)
    train = load_npz(data_path)
    val = load_npz(val_path) if val_path is not None else None
    tuned, history = finetune_verified(student, teacher, train, val, epochs=epochs, lr=lr,
                                       batch_size=batch_size, device=device, progress=progress)
    save_model(tuned, out)
    return {"output": str(out), "history": history}


def finetune_verified(student: onnx.ModelProto, teacher: onnx.ModelProto, train: Mapping[str, np.ndarray],
                      val: Mapping[str, np.ndarray] | None = None, **options: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """:func:`finetune`, then the full checker and an onnxruntime run of the result."""
    tuned, history = finetune(student, teacher, train, val, **options)
    feeds = _feeds_of(train, student, "train")
    first = slice(0, _fixed_batch(graph_inputs(student)) or 1)
    _verify(tuned, student, _batch(feeds, first, _input_types(student)))
    return tuned, history
