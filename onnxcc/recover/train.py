"""Recovery with gradients (torch): block-wise reconstruction, then end-to-end distillation.

Blocks (:mod:`.blocks`) are fitted in order, each fed what the *compressed* network before it
really produces and fitted to what the *original* computes at the same tensors (kept channels
only), in mean squared error relative to the original's variance: the upstream error is
undone where it arises instead of being left to the layers after it (BRECQ's order, for pruned
and factorized weights). Then the whole network is distilled on its outputs, judged as
:mod:`onnxcc.outputs` judges them. Image inputs are augmented so a few hundred samples are not
learnt by heart, and held-back samples decide which weights are kept (early stopping). The
graph itself is never changed: only its trained initializers are written back.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch

from ..config import Progress
from ..finetuning.executor import OnnxModule, export_weights
from ..runtime import expose_outputs, make_session
from .augment import augment, image_layout
from .blocks import Block
from .channels import ChannelMap
from .judge import OutputJudge, batch_size, run_batched
from .shared import SharedValues

log = logging.getLogger(__name__)

LR_BLOCKS = 1e-3    # 1e-4 left MobileNetV2's blocks under-fitted in the time given; 3e-3 overfits
LR_END = 2e-5
MIN_STEPS, MAX_STEPS = 20, 2000       # per block
MAX_END_STEPS = 4000
# passes over the same training samples, at most, per block and end to end: past this the held-back
# loss stops falling (on 8 samples open-nsfw's blocks got worse after 40), so a small calibration
# set ends recovery early instead of learning its samples by heart for the rest of the time given
MAX_EPOCHS = 100
EVALS = 8                             # held-back checks per block / end-to-end run
NOTHING_TO_FIT = 1e-6                 # a block's held-back loss (relative MSE) below which it is left as it is


@dataclass
class Budget:
    """The wall-clock budget of the gradient stages."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


def device_for(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _views(feeds: Mapping[str, np.ndarray], views: int, seed: int) -> dict[str, np.ndarray]:
    """The samples as given, then ``views - 1`` augmented copies of each (image inputs only)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, x in feeds.items():
        layout = image_layout(x.shape)
        parts = [x]
        for _ in range(views - 1):
            parts.append(augment(torch.from_numpy(x), layout, g).numpy() if layout else x)
        out[name] = np.concatenate(parts)
    return out


class _Targets:
    """The original's values of the compared tensors on every sample: computed once by
    onnxruntime, kept in files and read a batch at a time. Not memory-mapped: every page of a
    mapping that training touches stays in the process's resident memory, and the targets of all
    blocks outgrow the rest of recovery (PP-OCRv4 det at 640×640: 7.3 GB over 132 samples)."""

    SCALE_SAMPLES = 64   # relative MSE divides by each tensor's spread over the first samples

    def __init__(self, teacher: onnx.ModelProto, names: list[str], feeds: Mapping[str, np.ndarray],
                 kept: ChannelMap, folder: Path, provider: str):
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        spread: dict[str, tuple[int, float, float]] = {}   # elements, mean, sum of squared deviations
        n = len(next(iter(feeds.values())))
        sess = make_session(expose_outputs(teacher, names), provider) if names else None
        step = batch_size(teacher)
        for i in range(0, n, step):
            outs = run_batched(sess, names, {k: v[i:i + step] for k, v in feeds.items()}, step) if names else []
            for name, y in zip(names, outs):
                y = np.ascontiguousarray(kept[name].take(y) if name in kept else y, np.float32)
                if name not in self.files:
                    self.files[name], self.shapes[name] = folder / f"{len(self.files)}.f32", y.shape[1:]
                with open(self.files[name], "ab") as f:
                    y.tofile(f)
                if i < self.SCALE_SAMPLES:
                    spread[name] = _merged_spread(spread.get(name, (0, 0.0, 0.0)), y[: self.SCALE_SAMPLES - i])
        self.scale = {k: m2 / count + 1e-12 for k, (count, _, m2) in spread.items()}

    def batch(self, names: tuple[str, ...], idx: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        out = []
        for name in names:
            values = np.empty((len(idx), *self.shapes[name]), np.float32)
            with open(self.files[name], "rb") as f:
                for row, i in zip(values, np.sort(idx)):
                    f.seek(int(i) * row.nbytes)
                    f.readinto(row)
            out.append(torch.from_numpy(values).to(device))
        return out


def _merged_spread(acc: tuple[int, float, float], y: np.ndarray) -> tuple[int, float, float]:
    """(elements, mean, sum of squared deviations) of what ``acc`` summarises and ``y``, in
    float64 (Chan et al.'s pairwise update)."""
    count, mean, m2 = acc
    y = np.asarray(y, np.float64)
    k, m = y.size, float(y.mean())
    delta = m - mean
    total = count + k
    return total, mean + delta * k / total, m2 + float(np.sum((y - m) ** 2)) + delta ** 2 * count * k / total


class _Best:
    """The parameters at the lowest held-back score seen, to restore at the end (early stopping)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], score: float):
        self.params, self.score, self.first = params, score, score
        self.saved = {n: p.detach().clone() for n, p in params.items()}

    def offer(self, score: float) -> None:
        if score < self.score:
            self.score, self.saved = score, {n: p.detach().clone() for n, p in self.params.items()}

    def restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.saved[n])


def _relative_mse(outs: list[torch.Tensor], targets: list[torch.Tensor], scales: list[float]) -> torch.Tensor:
    return sum(((o - t) ** 2).mean() / s for o, t, s in zip(outs, targets, scales)) / len(outs)


def _epochs_steps(samples: int, batch: int) -> int:
    """Training steps of ``batch`` samples that make MAX_EPOCHS passes over ``samples``."""
    return math.ceil(MAX_EPOCHS * samples / batch)


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, steps: int) -> None:
    for group in opt.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / steps))


class Reconstructor:
    """The compressed model in torch, fitted block by block, then end to end."""

    def __init__(self, student: onnx.ModelProto, teacher: onnx.ModelProto, kept: ChannelMap,
                 train: Mapping[str, np.ndarray], judge: OutputJudge, shared: SharedValues, *, views: int,
                 batch: int, seed: int, device: torch.device, provider: str, progress: Progress | None = None):
        torch.manual_seed(seed)
        self.student, self.teacher, self.kept = student, teacher, kept
        self.judge, self.seed, self.device, self.provider, self.progress = judge, seed, device, provider, progress
        self.shared = shared
        self.train = dict(train)
        self.n_train = len(next(iter(train.values())))
        self.views = views
        self.module = OnnxModule(student).to(device).channels_last()
        self.module.eval()
        self.batch = min(batch, self.n_train)
        # a graph exported at batch 1 (Reshape targets with a literal 1) runs one sample at a time
        self.chunk = batch_size(student)
        readers = Counter(i for n in student.graph.node for i in n.input)
        self.shared_weights = {i.name for i in student.graph.initializer if readers[i.name] > 1}

    def _run(self, module: OnnxModule, feeds: Mapping[str, torch.Tensor], names,
             reads: tuple[str, ...] = ()) -> list[torch.Tensor]:
        """``names`` from ``feeds`` (a leading sample axis) and, of ``reads``, the tensors without
        one, computed for the size of each run."""
        def run(part: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            values = self.shared(len(next(iter(part.values()))))
            part.update({t: torch.from_numpy(np.asarray(values[t])).to(self.device) for t in reads if t in values})
            return module.run(part, list(names))

        n = len(next(iter(feeds.values())))
        if n <= self.chunk:
            return run(dict(feeds))
        parts = [run({k: v[i:i + self.chunk] for k, v in feeds.items()}) for i in range(0, n, self.chunk)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(names))]

    # ------------------------------------------------------------------ helpers
    def _to(self, feeds: Mapping[str, np.ndarray], idx: np.ndarray | slice) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(self.device) for k, v in feeds.items()}

    def _say(self, message: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(message, done, total)

    def _steps(self, budget: Budget, step, least: int, most: int) -> int:
        """How many training steps fit ``budget``, timed on two steps (whose gradients are dropped)."""
        step()
        t0 = time.perf_counter()
        step()
        self.module.zero_grad(set_to_none=True)
        return int(np.clip(budget.left() / (time.perf_counter() - t0), least, most))

    def export(self) -> onnx.ModelProto:
        return export_weights(self.module, self.student)

    # ------------------------------------------------------------------ blocks
    def blocks(self, blocks: list[Block], budget: Budget) -> list[dict]:
        """Fit each block in turn; a record per block (held-back loss before and after)."""
        data = _views(self.train, self.views, self.seed)
        n_tr = len(next(iter(data.values())))
        stop = self.judge.feeds
        feeds = {k: np.concatenate([data[k], stop[k]]) for k in data}
        tr_idx, st_idx = np.arange(n_tr), np.arange(n_tr, n_tr + len(next(iter(stop.values()))))
        compared = list(dict.fromkeys(t for b in blocks for t in b.compared))
        with tempfile.TemporaryDirectory(prefix="onnxcc-recover-") as folder:
            self._say("recover: the original's block outputs", 0, 1)
            targets = _Targets(self.teacher, compared, feeds, self.kept, Path(folder), self.provider)
            cache = {k: torch.from_numpy(v) for k, v in feeds.items()}
            log.info("block reconstruction: %d blocks in %.0f s", len(blocks), budget.left())
            records = []
            for k, b in enumerate(blocks):
                # each block gets an equal share of the time left; a cheap block leaves the rest to later ones
                share = Budget(budget.left() / (len(blocks) - k))
                records.append(self._fit_block(b, cache, targets, tr_idx, st_idx, share, k, len(blocks)))
                cache = self._advance(b, cache)
        return records

    def _block_loss(self, b: Block, cache: dict[str, torch.Tensor], targets: _Targets,
                    idx: np.ndarray, grad: bool) -> torch.Tensor:
        idx = np.sort(idx)
        feeds = {t: cache[t][idx].to(self.device) for t in b.inputs if t in cache}
        with torch.set_grad_enabled(grad):
            outs = self._run(self.module, feeds, b.compared, b.inputs)
        return _relative_mse(outs, targets.batch(b.compared, idx, self.device), [targets.scale[t] for t in b.compared])

    def _held_loss(self, b: Block, cache, targets, st_idx) -> float:
        return float(np.mean([self._block_loss(b, cache, targets, st_idx[i:i + self.batch], False).item()
                              for i in range(0, len(st_idx), self.batch)]))

    def _fit_block(self, b: Block, cache, targets: _Targets, tr_idx, st_idx, budget: Budget, k: int, of: int) -> dict:
        rec = {"block": k + 1, "nodes": [b.start, b.end], "layers": b.layers, "compared": list(b.compared)}
        params = self.module.parameters_for(b.compared, b.inputs) if b.compared else {}
        # a weight other nodes read too is left to end-to-end distillation, which sees every reader
        params = {k: p for k, p in params.items() if k not in self.shared_weights}
        if not params:
            return {**rec, "steps": 0}
        best = _Best(params, self._held_loss(b, cache, targets, st_idx))
        if best.first < NOTHING_TO_FIT:   # the block already reproduces the original: its time goes to later ones
            return {**rec, "steps": 0, "loss_before": round(best.first, 6)}
        opt = torch.optim.Adam(params.values(), lr=LR_BLOCKS)
        rng = np.random.default_rng(self.seed + k)
        steps = self._steps(budget, lambda: self._block_loss(b, cache, targets, tr_idx[: self.batch], True).backward(),
                            MIN_STEPS, min(MAX_STEPS, _epochs_steps(len(tr_idx), self.batch)))
        every = max(1, steps // EVALS)
        for s in range(steps):
            _cosine_lr(opt, LR_BLOCKS, s, steps)
            loss = self._block_loss(b, cache, targets, rng.choice(tr_idx, min(self.batch, len(tr_idx)), replace=False), True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = s + 1 == steps or (s + 1 >= MIN_STEPS and budget.left() < 0)
            if (s + 1) % every == 0 or last:
                held = self._held_loss(b, cache, targets, st_idx)
                best.offer(held)
                self._say(f"recover: block {k + 1}/{of} loss {loss.item():.4g}, held-back {held:.4g}", s + 1, steps)
            if last:
                break
        best.restore()
        log.info("block %d/%d (%d layers): held-back loss %.4g -> %.4g", k + 1, of, b.layers, best.first, best.score)
        return {**rec, "steps": s + 1, "loss_before": round(best.first, 6), "loss_after": round(best.score, 6)}

    def _advance(self, b: Block, cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The cached activations after block ``b``: what crosses the cut after it."""
        new = [t for t in b.live if t not in cache and t not in self.shared]
        n = len(next(iter(cache.values())))
        # written in place batch by batch: the cache is the largest thing recovery holds, and a
        # list of parts concatenated at the end would hold it twice over beside the old one
        produced: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for i in range(0, n, self.batch) if new else ():
                fed = {t: cache[t][i:i + self.batch].to(self.device) for t in b.inputs if t in cache}
                for t, o in zip(new, self._run(self.module, fed, new, b.inputs)):
                    if t not in produced:   # in the layout the module made it (channels-last for Convs)
                        last = o.dim() == 4 and o.is_contiguous(memory_format=torch.channels_last)
                        layout = torch.channels_last if last else torch.contiguous_format
                        produced[t] = torch.empty((n, *o.shape[1:]), dtype=o.dtype, memory_format=layout)
                    produced[t][i:i + len(o)] = o.cpu()
        return {t: cache[t] if t in cache else produced[t] for t in b.live if t not in self.shared}

    # ------------------------------------------------------------------ end to end
    def end_to_end(self, budget: Budget) -> dict:
        """Distil the whole network on its outputs with fresh augmentations; keep the weights
        that do least damage on the held-back samples."""
        teacher = OnnxModule(self.teacher).to(self.device).channels_last().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        names = self.judge.names
        # the judge's per-channel statistics of the original's outputs (keepdims: they broadcast)
        mu = [torch.as_tensor(np.asarray(s.mu), dtype=torch.float32, device=self.device) for s in self.judge.standardizers]
        sd = [torch.as_tensor(np.asarray(s.sd), dtype=torch.float32, device=self.device) for s in self.judge.standardizers]
        layouts = {k: image_layout(v.shape) for k, v in self.train.items()}
        g = torch.Generator().manual_seed(self.seed + 7)
        rng = np.random.default_rng(self.seed + 7)

        def loss_of() -> torch.Tensor:
            x = self._to(self.train, rng.choice(self.n_train, self.batch, replace=False))
            x = {k: augment(v, layouts[k], g) if layouts[k] else v for k, v in x.items()}
            with torch.no_grad():
                ref = self._run(teacher, x, names)
            out = self._run(self.module, x, names)
            return sum((((o - r) / d) ** 2).sum() / (((r - m) / d) ** 2).sum().clamp_min(1e-12)
                       for o, r, m, d in zip(out, ref, mu, sd)) / len(names)

        params = self.module.onnx_parameters()
        steps = self._steps(budget, lambda: loss_of().backward(), 0,
                            min(MAX_END_STEPS, _epochs_steps(self.n_train, self.batch)))
        if steps < EVALS or not params:
            return {"steps": 0}
        opt = torch.optim.Adam(params.values(), lr=LR_END)
        best = _Best(params, self._damage())
        every = max(1, steps // EVALS)
        history = []
        for s in range(steps):
            _cosine_lr(opt, LR_END, s, steps)
            loss = loss_of()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = s + 1 == steps or budget.left() < 0
            if (s + 1) % every == 0 or last:
                d = self._damage()
                history.append(round(d, 6))
                best.offer(d)
                self._say(f"recover: end-to-end loss {loss.item():.4g}, held-back damage {d:.4g}", s + 1, steps)
            if last:
                break
        best.restore()
        log.info("end-to-end distillation, %d steps: held-back damage %.4g -> %.4g", s + 1, best.first, best.score)
        return {"steps": s + 1, "damage_before": round(best.first, 6), "damage_after": round(best.score, 6),
                "history": history}

    def _damage(self) -> float:
        """The judge's damage, computed in torch (the same weights onnxruntime would run)."""
        feeds = self.judge.feeds
        n = len(next(iter(feeds.values())))
        parts = []
        with torch.no_grad():
            for i in range(0, n, self.batch):
                parts.append([o.cpu().numpy() for o in self._run(self.module, self._to(feeds, slice(i, i + self.batch)),
                                                                 self.judge.names)])
        outs = [np.concatenate([p[j] for p in parts]) for j in range(len(self.judge.names))]
        return float(np.mean([s.relative_error(o) for s, o in zip(self.judge.standardizers, outs)]))
