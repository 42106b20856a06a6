"""One fine-tuning run put together: data, teacher, student, optimiser, schedule, checkpoints.

:class:`Run` is built once per process (:meth:`Run.build`), then :meth:`Run.begin` evaluates the
untouched student or restores a checkpoint, :meth:`Run.train` runs the epochs, and
:meth:`Run.finish` keeps the best epoch and folds any re-inserted BatchNorm back. Imports torch.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch

from ..calib import ImagePreprocess
from ..config import EpochReport, FinetuneConfig, Progress
from ..errors import CalibrationError, UsageError
from ..runtime import providers_for
from .batchnorm import fold, insert, recalibrate
from .checkpoint import Checkpoints, fingerprint
from .data import ArraySamples, Batches, ImageFolder, TrainSet, as_samples, fixed_batch, is_batches
from .distributed import World
from .executor import OnnxModule
from .heads import Teacher, heads, rows_shape
from .loop import Distiller, EpochSampler, Shard, Student, loader, schedule

log = logging.getLogger(__name__)

Best = tuple[tuple[float, float], dict[str, torch.Tensor], int]   # (score, weights, epoch)
Source = TrainSet | Batches
STATISTICS_SAMPLES = 512   # what re-inserted BatchNorm's running statistics are measured on


def device_for(name: str, world: World) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA GPU (install a CUDA build of torch)")
    return f"cuda:{world.local_rank}" if name == "cuda" else "cpu"


def _teacher_provider(device: str) -> str:
    """The teacher runs where the student trains (each torchrun process on its own GPU)."""
    if device.startswith("cuda"):
        try:
            providers_for(device)
            return device
        except UsageError:
            log.info("onnxruntime has no CUDA provider: the teacher runs on the CPU")
    return "cpu"


def _classes(source: Source, what: str, teach: Teacher, label_head: int | None,
             first: dict[str, np.ndarray]) -> int | None:
    """The number of classes labels index (None without labels), checked where the source tells."""
    samples = source if isinstance(source, Batches) else source.samples
    if not samples.labeled:
        return None
    if label_head is None:
        raise UsageError(f"{what} data has labels but the model has no class-score output")
    n_rows, classes = rows_shape(teach.outputs(first)[label_head].shape, teach.heads[label_head])
    per_sample = n_rows / len(next(iter(first.values())))
    if per_sample != 1:
        raise UsageError(f"{what} labels need one class-score row per sample; the model gives {per_sample:g}")
    top = (len(samples.classes) - 1 if isinstance(samples, ImageFolder)
           else int(samples.y.max()) if isinstance(samples, ArraySamples) else None)
    if top is not None and top >= classes:
        raise CalibrationError(f"{what} labels must be {len(samples)} class indices in [0, {classes}); the data "
                               f"has {top + 1} classes")
    return classes


def _workers(cfg: FinetuneConfig, tr: Source) -> int:
    """Decoding images is worth worker processes; arrays (in memory or mapped) are read in place."""
    if isinstance(tr, Batches):
        return 0   # the caller's loader has its own
    if cfg.workers is not None:
        return cfg.workers
    return min(4, max(1, (os.cpu_count() or 2) - 1)) if isinstance(tr.samples, ImageFolder) else 0


def _score(metrics: dict[str, float]) -> tuple[float, float]:
    """Higher is better: accuracy first when there are labels, then a low distillation loss."""
    return metrics.get("acc", 0.0), -metrics["loss"]


def _check_shapes(net: Student, teach: Teacher, feeds: dict[str, np.ndarray], device: str) -> None:
    """Fail early, in one line, when the student does not produce the teacher's shapes."""
    with torch.no_grad():
        probe = net({k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
    for p, t, name in zip(probe, teach.outputs(feeds), net.names):
        if tuple(p.shape) != t.shape:
            raise UsageError(f"student tensor {name!r} has shape {tuple(p.shape)}, the teacher's "
                             f"{t.shape}: is the student compressed from this teacher?")


def _source(data: Any, student: onnx.ModelProto, teacher: onnx.ModelProto, what: str,
            preprocess: ImagePreprocess | None, cfg: FinetuneConfig | None = None,
            classes: list[str] | None = None) -> Source:
    """Samples (augmented for training when ``cfg`` says so), or the caller's batches; checked
    against both models' inputs."""
    if is_batches(data):
        source: Source = Batches(data, student, what)
    else:
        samples = as_samples(data, student, what, preprocess, classes)
        augment = cfg is not None and cfg.augment
        source = TrainSet(samples, student, what, augment=augment, seed=cfg.seed if cfg is not None else 0)
    source.expect(teacher)
    return source


def _statistics_batches(tr: Source, batch: int, device: str, seed: int, samples: int = STATISTICS_SAMPLES):
    """What the re-inserted BatchNorm's statistics are measured on, the same in every process:
    ``samples`` training samples drawn at random once (sources are often sorted by class),
    augmented as in training (with statistics of clean images the normalisation at evaluation
    would differ from the one the weights were trained under), in global batches; from the
    caller's batches, as many of the first as hold that many samples."""
    def from_samples():
        pick = np.sort(np.random.default_rng(seed).permutation(len(tr))[:samples])
        for i in range(0, len(pick), batch):
            rows = [tr[(int(k), 0)][0] for k in pick[i:i + batch]]
            yield {name: torch.from_numpy(np.stack([r[name] for r in rows])).to(device) for name in rows[0]}

    def from_batches():
        seen = 0
        for x, _ in tr:
            if seen >= samples:
                return
            yield {k: v.to(device) for k, v in x.items()}
            seen += len(next(iter(x.values())))
    return from_batches if isinstance(tr, Batches) else from_samples


def _class_names(tr: Source) -> list[str] | None:
    """The training image folder's classes: a validation folder numbers its own the same way."""
    samples = getattr(tr, "samples", None)
    return samples.classes if isinstance(samples, ImageFolder) and samples.classes else None


def _with_batchnorm(net: Student, tr: Source, cfg: FinetuneConfig, world: World, device: str,
                    dynamic: bool) -> Callable[[], Iterator[dict[str, torch.Tensor]]] | None:
    """Re-insert BatchNorm (where asked and the batch is not fixed: batch statistics need the whole
    batch in one forward); returns the batches its statistics are measured on, or None."""
    if not cfg.batchnorm:
        return None
    if not dynamic:
        log.info("the model's batch is fixed: trained without re-inserted BatchNorm")
        return None
    statistics = _statistics_batches(tr, cfg.batch_size, device, cfg.seed)
    # the caller's batches differ per process: their statistics are summed over all of them
    reduce = world.sum if isinstance(tr, Batches) and world.size > 1 else None
    return statistics if insert(net.module, statistics(), sync=world.size > 1, reduce=reduce) else None


def _parallel(net: Student, world: World, device: str) -> torch.nn.Module:
    """The student as each process calls it: wrapped in DistributedDataParallel under torchrun."""
    if world.size == 1:
        return net
    reached = {id(p) for p in net.module.parameters_for(net.names).values()}
    reached |= {id(p) for p in net.module.after.parameters()}
    unused = any(p.requires_grad and id(p) not in reached for p in net.parameters())
    # buffers are constants or BatchNorm statistics of the global batch: the same in every process
    return torch.nn.parallel.DistributedDataParallel(
        net, device_ids=[world.local_rank] if device.startswith("cuda") else None, find_unused_parameters=unused,
        broadcast_buffers=False)


class Run:
    """Everything one process of a fine-tuning run holds."""

    def __init__(self, cfg: FinetuneConfig, world: World, d: Distiller, tr: Source, va: Source | None,
                 workers: int, fp: str):
        self.cfg, self.world, self.d, self.tr, self.va, self.fp = cfg, world, d, tr, va, fp
        self.net = d.student
        local = cfg.batch_size // world.size
        if isinstance(tr, Batches):
            self.batches, self.set_epoch = tr, tr.set_epoch
        else:
            sampler = EpochSampler(len(tr), world, cfg.seed)
            self.batches, self.set_epoch = loader(tr, local, sampler, workers), sampler.set_epoch
        self.val_batches = (va if isinstance(va, Batches) or va is None
                            else loader(va, local, Shard(len(va), world), 0))
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = (torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam"
                    else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9))
        self.steps = len(self.batches)
        self.total = cfg.epochs * self.steps
        self.sched = schedule(self.opt, self.total, round(cfg.warmup * self.total))
        self.statistics: Callable[[], Iterator[dict[str, torch.Tensor]]] | None = None   # with re-inserted BatchNorm
        self.history: dict[str, Any] = {"epochs": [], "initial": {}, "world_size": world.size, "rank": world.rank,
                                        "train_" + ("batches" if isinstance(tr, Batches) else "samples"): len(tr),
                                        "augmented": sorted(tr.images), "workers": workers}

    @classmethod
    def build(cls, student: onnx.ModelProto, teacher: onnx.ModelProto, train: Any, val: Any, cfg: FinetuneConfig,
              world: World, preprocess: ImagePreprocess | None) -> "Run":
        device = device_for(cfg.device, world)
        if cfg.batch_size % world.size:
            raise UsageError(f"the batch size {cfg.batch_size} is split across {world.size} processes: make it a "
                             "multiple of that")
        local = cfg.batch_size // world.size
        s_heads = heads(student)
        label_head = next((k for k, h in enumerate(s_heads) if h.axis is not None), None)
        teach = Teacher(teacher, heads(teacher), fixed_batch(teacher), _teacher_provider(device))
        tr = _source(train, student, teacher, "train", preprocess, cfg=cfg)
        # the caller's batches go through whole; slices of a fixed batch where the graph bakes one in
        chunk = fixed_batch(student) or (1 << 30 if isinstance(tr, Batches) else local)
        probe = tr.first(min(chunk, local))
        classes = _classes(tr, "train", teach, label_head, probe)
        va = _source(val, student, teacher, "val", preprocess, classes=_class_names(tr)) if val is not None else None
        if va is not None:
            classes = _classes(va, "val", teach, label_head, va.first(min(chunk, local))) or classes

        net = Student(OnnxModule(student).to(device), [h.tensor for h in s_heads], fixed_batch(student))
        _check_shapes(net, teach, probe, device)
        statistics = _with_batchnorm(net, tr, cfg, world, device, dynamic=fixed_batch(student) is None)
        amp = cfg.amp and device.startswith("cuda") and torch.cuda.is_bf16_supported()
        d = Distiller(net, _parallel(net, world, device), teach, s_heads, label_head, classes, cfg.temperature,
                      cfg.alpha, device, world, amp)
        settings = {k: v for k, v in vars(cfg).items() if k not in ("device", "workers", "amp")}
        fp = fingerprint(student, teacher, len(tr), {**settings, "val": len(va) if va is not None else None,
                                                      "preprocess": preprocess})
        run = cls(cfg, world, d, tr, va, _workers(cfg, tr), fp)
        run.statistics = statistics
        run.history["batchnorm_inserted"] = len(net.module.after)
        return run

    def begin(self, resume_from: Checkpoints | None) -> tuple[Best | None, int]:
        """The best epoch so far and the first epoch to run: from a checkpoint, or from the
        untouched student's validation (epoch 0)."""
        state = resume_from.load(self.fp) if resume_from is not None else None
        if state is not None:
            self.d.load(state["params"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            self.history = {**state["history"], "rank": self.world.rank, "resumed_from": state["epoch"]}
            log.warning("resuming from the checkpoint of epoch %d/%d in %s", state["epoch"], self.cfg.epochs,
                        resume_from.folder)
            b = state["best"]
            return ((tuple(b["score"]), b["params"], b["epoch"]) if b else None), state["epoch"] + 1
        if self.val_batches is None:
            return None, 1
        initial = self.d.evaluate(self.val_batches)
        self.history["initial"] = {f"val_{k}": v for k, v in initial.items()}
        return (_score(initial), self.d.state(), 0), 1

    def train(self, start: int, best: Best | None, store: Checkpoints | None, progress: Progress | None,
              on_epoch: EpochReport | None) -> Best | None:
        """Epochs ``start``..last; each one checkpointed (by the main process) and reported."""
        cfg, done, began = self.cfg, (start - 1) * self.steps, time.monotonic()

        def on_step() -> None:
            nonlocal done
            done += 1
            if progress and self.world.main:
                progress(f"fine-tuning epoch {min(cfg.epochs, 1 + (done - 1) // self.steps)}/{cfg.epochs}",
                         done, self.total)

        for epoch in range(start, cfg.epochs + 1):
            t0 = time.monotonic()
            self.net.train()
            self.set_epoch(epoch)
            row = {"epoch": epoch, "train_loss": self.d.train_epoch(self.batches, self.opt, self.sched, on_step),
                   "lr": self.opt.param_groups[0]["lr"]}
            self._recalibrate()
            if self.val_batches is not None:
                metrics = self.d.evaluate(self.val_batches)
                row.update({f"val_{k}": v for k, v in metrics.items()})
                if _score(metrics) > best[0]:
                    best = (_score(metrics), self.d.state(), epoch)
            row["seconds"] = round(time.monotonic() - t0, 2)
            row["eta_seconds"] = round((time.monotonic() - began) / (epoch - start + 1) * (cfg.epochs - epoch), 1)
            self.history["epochs"].append(row)
            if store is not None and self.world.main:
                store.save({"fingerprint": self.fp, "epoch": epoch, "params": self.d.state(),
                            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "history": self.history,
                            "best": {"score": list(best[0]), "params": best[1], "epoch": best[2]} if best else None})
            if on_epoch and self.world.main:
                on_epoch(dict(row, epochs=cfg.epochs))
            log.info("epoch %d/%d: %s", epoch, cfg.epochs, row)
        return best

    def _recalibrate(self) -> None:
        if self.statistics is not None:
            reduce = self.world.sum if isinstance(self.tr, Batches) and self.world.size > 1 else None
            recalibrate(self.net.module, self.statistics(), reduce)

    def finish(self, best: Best | None) -> OnnxModule:
        """The student with the best epoch's weights (any BatchNorm folded back), ready to export."""
        if best is not None:
            self.d.load(best[1])
        self.history["best_epoch"] = best[2] if best is not None else self.cfg.epochs
        labeled = any("val_acc" in r for r in [self.history["initial"], *self.history["epochs"]])
        self.history["selected_by"] = "last" if self.va is None else ("val_acc" if labeled else "val_loss")
        if self.statistics is not None:
            fold(self.net.module)
        return self.net.module
