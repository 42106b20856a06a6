"""Post-training recovery of a compressed model from unlabeled calibration samples.

    cut ─ statistics (numpy) ─ blocks (torch) ─ end to end (torch)

Each stage starts from the best model so far, judged on samples held back from training (early
stopping, also against overfitting a few hundred samples). Which stage is written is decided on
samples that neither training nor early stopping saw, where the caller has them (compress's
held-back share): the early-stopped stages look better than they are on the samples that
stopped them, and a dozen samples decide between stages a few points apart by chance. Only
initializer values change: the nodes, shapes and names of the compressed model stay as they
are, so its speed does too.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

from ..analysis.costs import node_macs
from ..analysis.view import build_view, graph_inputs
from ..calib import Calibration
from ..config import RECOVER_MODES as MODES, RECOVER_STAGES as STAGES, Progress
from ..errors import PassContractError, UsageError
from ..memory import available_bytes
from ..ops import OPS
from ..passes.base import Pass, PassRecord, PassResult
from ..passes.normalize import normalize
from ..runtime import expose_outputs, make_session
from ..verify import fidelity
from .blocks import partition
from .channels import ChannelMap, read_channel_map
from .judge import OutputJudge
from .shared import SharedValues, sample_free
from .stats import recover_statistics

log = logging.getLogger(__name__)

STOP_FRACTION = 1 / 8       # of the samples recovery gets, held back to decide what is kept
MIN_STOP = 4
MIN_SAMPLES = 2 * MIN_STOP  # recovery trains on at least as many samples as it stops on
TRAIN_MEMORY = 2 << 30      # bytes of activations one training batch may hold (forward + backward)
CACHE_MEMORY = 3 << 30      # bytes of block inputs cached for every training sample
MAX_VIEWS = 4               # each sample as given plus up to 3 augmented copies
MAX_BATCH = 16              # training samples per step, fewer where their activations outgrow TRAIN_MEMORY
MEMORY_SHARE = 0.25         # of the available memory, at most, for each of the two above
BLOCK_SHARE = 0.55          # of the gradient stages' time: block reconstruction; the rest end to end


def memory_budgets() -> tuple[int, int]:
    """Bytes for a training batch's activations and for the cached block inputs: TRAIN_MEMORY and
    CACHE_MEMORY, or a share of what is available where that is less (a laptop's 8 GB)."""
    free = available_bytes()
    if free is None:
        return TRAIN_MEMORY, CACHE_MEMORY
    return min(TRAIN_MEMORY, int(free * MEMORY_SHARE)), min(CACHE_MEMORY, int(free * MEMORY_SHARE))


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def default_seconds(macs: int) -> float:
    """Recovery's default time: a minute plus ~33 minutes per GMAC of the compressed model, at
    most 10 minutes (a MobileNetV2 at 30% fewer MACs: about 8)."""
    return float(min(600.0, 60.0 + 2000.0 * macs / 1e9))


@dataclass
class RecoverResult:
    model: onnx.ModelProto
    record: dict[str, Any]
    stages: dict[str, onnx.ModelProto] = field(default_factory=dict)   # each stage's result, kept or not


def _activations(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every node output of ``model`` on one sample (shapes and dtypes to plan with)."""
    names = [o for n in model.graph.node if n.op_type != "Constant" for o in n.output if o]
    sess = make_session(expose_outputs(model, names), optimize="none")
    outs = sess.run(None, dict(feed))
    vals = {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), outs)}
    vals.update(feed)
    return vals


def _macs(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> int:
    view = build_view(model, {k: v.shape for k, v in feed.items()}, dict(feed))
    return sum(node_macs(view, n) for n in view.nodes)


def structure(model: onnx.ModelProto) -> tuple:
    """What recovery must not change: nodes with their wiring and attributes, initializer names,
    types and shapes, inputs and outputs."""
    g = model.graph
    return (tuple(n.SerializeToString() for n in g.node if n.op_type != "Constant"),
            tuple((i.name, i.data_type, tuple(i.dims)) for i in g.initializer),
            tuple(i.SerializeToString() for i in g.input), tuple(o.SerializeToString() for o in g.output))


def comparable(student: Mapping[str, np.ndarray], teacher: Mapping[str, np.ndarray], kept: ChannelMap) -> set[str]:
    """Float tensors both models compute whose values line up (the kept channels of the original's)."""
    out = set()
    for name, s in student.items():
        t = teacher.get(name)
        if t is None or s.dtype.kind != "f":
            continue
        if name in kept:
            t = kept[name].take(t) if kept[name].index.max() < t.shape[kept[name].axis] else None
        if t is not None and t.shape == s.shape:
            out.add(name)
    return out


def _split(feeds: Mapping[str, np.ndarray], seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Training and stopping samples, the latter drawn at random: files sorted by class or by
    source must not leave one kind of sample out of either."""
    n = len(next(iter(feeds.values())))
    if n < MIN_SAMPLES:
        raise UsageError(f"recovery needs at least {MIN_SAMPLES} calibration samples, got {n}")
    k = max(MIN_STOP, int(round(n * STOP_FRACTION)))
    stop = np.zeros(n, bool)
    stop[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    return {a: v[~stop] for a, v in feeds.items()}, {a: v[stop] for a, v in feeds.items()}


def recover(student: onnx.ModelProto, teacher: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
            mode: str = "blocks", seconds: float | None = None, macs: int | None = None, seed: int = 0,
            provider: str = "cpu", device: str = "auto", progress: Progress | None = None,
            teacher_normalized: bool = False, choose_on: Mapping[str, np.ndarray] | None = None) -> RecoverResult:
    """Give back what compressing ``teacher`` into ``student`` cost, from unlabeled ``feeds``
    (graph input name → samples). ``mode``: ``stats`` (no torch needed) or ``blocks`` (statistics,
    then block-wise reconstruction and end-to-end distillation). ``seconds`` is the whole
    recovery's time, by default :func:`default_seconds` of ``macs``: the gradient stages get what
    the statistics stage leaves of it. ``choose_on``: samples recovery never trains or stops on
    that choose the stage kept (by default, the stopping samples do)."""
    if mode not in MODES:
        raise UsageError(f"--recover must be one of {', '.join(MODES)}")
    t0 = time.perf_counter()
    teacher = teacher if teacher_normalized else normalize(teacher).model
    names = {i.name for i in graph_inputs(student)}
    if names != {i.name for i in graph_inputs(teacher)} or not names <= set(feeds):
        raise UsageError("the compressed model and the original must have the same inputs, and the samples "
                         f"must feed them: {sorted(names)}")
    if mode == "none":
        return RecoverResult(student, {"mode": "none"})
    train, stop = _split({k: feeds[k] for k in names}, seed)
    kept = read_channel_map(student)
    if progress:
        progress("recover: the original on held-back samples", 0, 1)
    judge = OutputJudge(teacher, stop, provider)
    chooser = OutputJudge(teacher, {k: choose_on[k] for k in names}, provider) if choose_on is not None else None
    one = {k: v[:1] for k, v in train.items()}
    s_vals, t_vals = _activations(student, one), _activations(teacher, one)
    free = sample_free(student)
    shared = SharedValues(student, free, one, provider)
    same = comparable(s_vals, t_vals, kept) - free
    record: dict[str, Any] = {"mode": mode, "train_samples": len(next(iter(train.values()))),
                              "held_back_samples": len(next(iter(stop.values()))), "damage": {}}
    stages = {"cut": student}
    t_judge = time.perf_counter()
    record["damage"]["cut"] = best_damage = judge.damage(student)
    # the last stage leaves time for its export and its check, each about what this check took,
    # and for judging every stage on the choosing samples
    finish = 2 * (time.perf_counter() - t_judge)
    if chooser is not None:
        t_choose = time.perf_counter()
        record["choice_damage"] = {"cut": chooser.damage(student)}
        record["choice_samples"] = len(next(iter(chooser.feeds.values())))
        finish += (len(STAGES) - 1) * (time.perf_counter() - t_choose)
    best = student
    if progress:
        progress("recover: statistics", 0, 1)
    stat_model, record["statistics"] = recover_statistics(student, teacher, same, kept, train, s_vals, shared, judge,
                                                          provider)
    stages["statistics"] = stat_model
    record["damage"]["statistics"] = d = judge.damage(stat_model)
    if d < best_damage:
        best, best_damage = stat_model, d
    if mode == "blocks":
        why_not = _why_no_gradients(student, teacher)
        if why_not:
            log.warning("recovery ran its statistics stage only: %s", why_not)
            record["mode"], record["why_stats_only"] = "stats", why_not
        else:
            if seconds is None:
                seconds = default_seconds(macs if macs is not None else _macs(student, one))
            record["budget_seconds"] = round(seconds, 1)
            deadline = t0 + seconds - finish
            best, best_damage = _gradient_stages(best, best_damage, teacher, kept, train, judge, s_vals, same, shared,
                                                 record, stages, deadline, seed, provider, device, progress)
    if chooser is not None:
        record["choice_damage"].update({k: chooser.damage(m) for k, m in stages.items() if k != "cut"})
    chosen_by = record["choice_damage"] if chooser is not None else record["damage"]
    record["kept"] = min(chosen_by, key=chosen_by.get)
    best = stages[record["kept"]]
    if structure(best) != structure(student):
        raise PassContractError("recovery changed the compressed model's graph, not only its weights")
    record["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("recovery: held-back damage %s; keeping %s", ", ".join(f"{k} {v:.4g}" for k, v in record["damage"].items()),
             record["kept"])
    return RecoverResult(best, record, stages)


def _why_no_gradients(student: onnx.ModelProto, teacher: onnx.ModelProto) -> str | None:
    """Why block reconstruction cannot run here (None: it can)."""
    if not torch_available():
        return "torch is not installed (pip install 'onnxcc[torch]' adds block-wise reconstruction and distillation)"
    bad = OPS.missing("executor", [*student.graph.node, *teacher.graph.node])
    return f"the torch executor does not run {', '.join(s.name for s in bad)}" if bad else None


def _gradient_stages(start: onnx.ModelProto, start_damage: float, teacher: onnx.ModelProto, kept: ChannelMap,
                     train: dict, judge: OutputJudge, s_vals: dict, same: set[str], shared: SharedValues,
                     record: dict, stages: dict, deadline: float, seed: int, provider: str, device: str,
                     progress: Progress | None) -> tuple[onnx.ModelProto, float]:
    """Block reconstruction, then end-to-end distillation, both done by ``deadline`` (perf_counter)."""
    from .train import Budget, Reconstructor, device_for

    floats = {k for k, v in s_vals.items() if v.dtype.kind == "f" and k not in shared}
    blocks = partition(start, floats, same)
    per_sample = sum(v.nbytes for k, v in s_vals.items() if k in floats)
    train_memory, cache_memory = memory_budgets()
    batch = int(np.clip(train_memory // (3 * per_sample + 1), 1, MAX_BATCH))
    n = len(next(iter(train.values()))) + len(next(iter(judge.feeds.values())))
    widest = max([sum(s_vals[t].nbytes for t in set(b.inputs) | set(b.live)) for b in blocks] + [1])
    views = int(np.clip(cache_memory // (n * widest), 1, MAX_VIEWS))
    rec = Reconstructor(start, teacher, kept, train, judge, shared, views=views, batch=batch, seed=seed,
                        device=device_for(device), provider=provider, progress=progress)
    record["blocks"] = rec.blocks(blocks, Budget((deadline - time.perf_counter()) * BLOCK_SHARE))
    record["views"], record["batch"] = views, rec.batch
    stages["blocks"] = m = rec.export()
    record["damage"]["blocks"] = d = judge.damage(m)
    best, best_damage = (m, d) if d < start_damage else (start, start_damage)
    if best is not m:   # the end-to-end stage starts from the best weights so far
        rec = Reconstructor(best, teacher, kept, train, judge, shared, views=views, batch=batch, seed=seed,
                            device=device_for(device), provider=provider, progress=progress)
    record["end_to_end"] = rec.end_to_end(Budget(deadline - time.perf_counter()))
    stages["end-to-end"] = m = rec.export()
    record["damage"]["end-to-end"] = d = judge.damage(m)
    return (m, d) if d < best_damage else (best, best_damage)


def recover_checked(student: onnx.ModelProto, teacher: onnx.ModelProto, fit: Calibration, held: Calibration,
                    **options: Any) -> RecoverResult:
    """:func:`recover` on ``fit``; ``held`` (samples it never trains or stops on) chooses the stage
    kept where it has MIN_STOP or more, and every stage's fidelity on them is in the record. Too
    few samples, or synthetic ones, leave the model as it is."""
    if fit.synthetic or len(fit) < MIN_SAMPLES:
        why = "no calibration samples were given" if fit.synthetic else f"only {len(fit)} calibration samples"
        (log.info if fit.synthetic else log.warning)(
            "recovery skipped: %s (it tunes weights on %d or more real ones)", why, MIN_SAMPLES)
        return RecoverResult(student, {"mode": "none", "skipped": why})
    choose_on = held.samples if len(held) >= MIN_STOP else None
    res = recover(student, teacher, fit.samples, choose_on=choose_on, **options)
    provider = options.get("provider", "cpu")
    res.record["held_out"] = {stage: fidelity(teacher, m, held, provider) for stage, m in res.stages.items()}
    return res


@dataclass(frozen=True)
class RecoverRecord(PassRecord):
    record: dict = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return int(self.record.get("kept", "cut") != "cut")


class RecoverPass(Pass):
    """``RecoverPass(original, samples)(compressed)``: :func:`recover` as a pass."""

    name = "Recover"

    def __init__(self, teacher: onnx.ModelProto, feeds: Mapping[str, np.ndarray], **options: Any) -> None:
        self.teacher, self.feeds, self.options = teacher, feeds, options

    def call(self, model: onnx.ModelProto) -> PassResult:
        res = recover(model, self.teacher, self.feeds, **self.options)
        return PassResult(res.model, RecoverRecord(self.name, res.record))
