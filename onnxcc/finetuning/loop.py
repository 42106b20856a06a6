"""The distillation loop in torch: the student's head tensors, the loss, an epoch, an evaluation.

Imports torch; :mod:`onnxcc.finetuning.train` loads it only when fine-tuning runs.
Under ``torchrun`` every rank runs this loop on its shard of each global batch; gradients are
averaged by DistributedDataParallel, and evaluation sums are all-reduced, so every rank sees the
same numbers as a single process with the same global batch.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import CalibrationError, UsageError
from .data import UNLABELED, TrainSet
from .distributed import World
from .executor import OnnxModule
from .heads import Head, Teacher, rows, slices


class Student(torch.nn.Module):
    """The student's head tensors (logits before a Softmax, dense maps) as one ``forward``, so
    DistributedDataParallel sees one call per step. A graph that bakes a fixed batch size into
    its Reshapes runs in slices of that size (see :func:`slices`)."""

    def __init__(self, module: OnnxModule, names: Sequence[str], fixed: int | None):
        super().__init__()
        self.module, self.names, self.fixed = module, list(names), fixed

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return slices(lambda part: self.module.run(part, self.names), feeds, self.fixed, torch.cat)


def schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded shuffle, re-drawn per epoch and tagged with it. Rank r's k-th
    batch of b and the other ranks' together are the k-th global batch of b x world of a single
    process (DistributedSampler interleaves one permutation) when the sample count is a multiple
    of the process count; otherwise DistributedSampler repeats a few samples to even the shares."""

    def __init__(self, n: int, world: World, seed: int, shuffle: bool = True):
        super().__init__()
        self.inner = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=shuffle,
                                        seed=seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class Shard(torch.utils.data.Sampler):
    """Every ``world``-th sample from ``rank`` on, once (evaluation: all-reduced sums need no padding)."""

    def __init__(self, n: int, world: World):
        super().__init__()
        self.idx = range(world.rank, n, world.size)

    def __iter__(self):
        return ((i, 0) for i in self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def loader(data: TrainSet, batch: int, sampler: torch.utils.data.Sampler, workers: int) -> DataLoader:
    # persistent workers are started once, not per epoch; the sampler runs in this process, so
    # its set_epoch needs no message to them
    return DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=False)


@dataclass
class Distiller:
    """Scores the student against the teacher: KL at ``temperature`` on class scores (T² scaled),
    MSE on anything else; with labels ``alpha * distillation + (1 - alpha) * cross-entropy``."""

    student: Student
    model: torch.nn.Module          # what is called: the student, or its DDP wrapper
    teacher: Teacher
    heads: list[Head]
    label_head: int | None
    classes: int | None
    temperature: float
    alpha: float
    device: str
    world: World
    amp: bool = False

    def _forward(self, x: Mapping[str, torch.Tensor], train: bool) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        feeds = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext():
            outs = (self.model if train else self.student)(feeds)
        return [o.float() for o in outs], self.teacher.outputs({k: v.numpy() for k, v in x.items()})

    def loss(self, student: list[torch.Tensor], teacher: list[np.ndarray], y: torch.Tensor | None) -> torch.Tensor:
        T = self.temperature
        total = torch.zeros((), device=self.device)
        for s, t, head in zip(student, teacher, self.heads):
            t = torch.from_numpy(t).to(self.device)
            if head.axis is None:
                total = total + F.mse_loss(s, t)
                continue
            log_p = F.log_softmax(rows(s, head) / T, dim=1)
            log_q = F.log_softmax(rows(t, head) / T, dim=1)
            # T^2 keeps the gradient scale independent of the temperature (Hinton et al.)
            total = total + F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * T ** 2
        if y is not None:
            ce = F.cross_entropy(rows(student[self.label_head], self.heads[self.label_head]), y.to(self.device))
            total = self.alpha * total + (1 - self.alpha) * ce
        return total

    def _labels(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.label_head is None or bool((y == UNLABELED).all()):
            return None
        if bool((y < 0).any()) or int(y.max()) >= (self.classes or 0):
            raise CalibrationError(f"labels must be class indices in [0, {self.classes}) for every sample; "
                                   f"got {int(y.min())}..{int(y.max())}")
        return y

    def train_epoch(self, batches: DataLoader, opt: torch.optim.Optimizer, sched: Any,
                    on_step: Callable[[], None]) -> float:
        """One pass; returns the mean training loss over all ranks' samples."""
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in batches:
            outs, soft = self._forward(x, train=True)
            loss = self.loss(outs, soft, self._labels(y))
            if not torch.isfinite(loss):
                raise UsageError(f"fine-tuning diverged (loss {float(loss.detach())}); try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += torch.tensor([float(loss.detach()) * len(y), len(y)], dtype=torch.float64)
            on_step()
        total = self.world.sum(total)
        return float(total[0] / total[1])

    @torch.no_grad()
    def evaluate(self, batches: DataLoader) -> dict[str, float]:
        """Distillation loss (and accuracy with labels) over every rank's shard."""
        sums = torch.zeros(4, dtype=torch.float64)  # loss * n, n, correct, labeled
        self.student.eval()
        for x, y in batches:
            outs, soft = self._forward(x, train=False)
            n = len(y)
            sums[0] += float(self.loss(outs, soft, None)) * n
            sums[1] += n
            if self._labels(y) is not None:
                pred = rows(outs[self.label_head], self.heads[self.label_head]).argmax(dim=1).cpu()
                sums[2] += int((pred == y).sum())
                sums[3] += n
        sums = self.world.sum(sums)
        metrics = {"loss": float(sums[0] / sums[1])}
        if sums[3]:
            metrics["acc"] = float(sums[2] / sums[3])
        return metrics

    def state(self) -> dict[str, torch.Tensor]:
        """Everything trained: the ONNX weights and any re-inserted BatchNorm."""
        return {k: t.detach().cpu().clone() for k, t in self.student.state_dict().items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.student.load_state_dict(state)
