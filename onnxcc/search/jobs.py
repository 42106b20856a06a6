"""Damage measurement as independent jobs, run here or on Ray workers.

A job is what a candidate changes (the names of the weights it sets and their values); its result
is the damage of the probe graph's outputs on the probe samples when those weights replace the
step's base weights. A :class:`DamageRunner` holds all one measurement needs (the probe graph,
its samples, the original outputs' standardizers); it is built from plain values, so a Ray worker
builds its own from the graph and samples put in Ray's object store once per search.

:class:`RayPool` keeps a runner per worker and sends each worker jobs in runs of neighbouring
cuts, so the activations before a cut, cached per call, serve the whole run. Jobs return in any
order; results are placed by index, so the damages, and the plan, are those measured here.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..errors import UsageError
from ..outputs import Standardizer
from ..runtime import make_session, quiet_run
from .suffix import SuffixRunner, batches

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]
Job = tuple[int, Sequence[str], Weights]      # (index, names of the changed weights, their values)
Change = tuple[Sequence[str], Callable[[], Weights]]
JOBS_PER_CALL = 8     # jobs a worker measures per call: few enough to balance, enough to reuse its cache


@dataclass(frozen=True)
class RunnerSpec:
    """What a :class:`DamageRunner` is built from: plain, picklable values."""

    model: bytes                       # the probe graph (weights of measured layers are inputs)
    feeds: dict[str, np.ndarray]
    targets: list[str]
    standardizers: list[Standardizer]
    sample_bytes: dict[str, int]       # bytes per sample of each tensor (sizes the cut cache)
    batch: int
    provider: str = "cpu"
    threads: int = 0


class DamageRunner:
    """Runs the probe graph from the first node a job's weights feed, and scores its outputs."""

    def __init__(self, spec: RunnerSpec, model: onnx.ModelProto | None = None, session=None) -> None:
        """``model``/``session``: the graph (and a session of it) already at hand, where
        ``spec.model`` may be left empty."""
        self.spec = spec
        model = model if model is not None else onnx.load_from_string(spec.model)
        self.session = session if session is not None else make_session(model, spec.provider, spec.threads)
        self.suffixes = SuffixRunner(model, spec.feeds, spec.targets, lambda t: spec.sample_bytes.get(t, 4),
                                     spec.batch, spec.provider, spec.threads)

    def run(self, weights: Weights, outputs: list[str]) -> list[np.ndarray]:
        """``outputs`` over all samples with ``weights`` fed."""
        return run_batched(self.session, weights, outputs, self.spec.feeds, self.spec.batch)

    def damage_of(self, outputs: list[np.ndarray]) -> float:
        return float(np.mean([std.relative_error(o) for o, std in zip(outputs, self.spec.standardizers)]))

    def damages(self, base: Weights, changes: Sequence[Change]) -> Iterator[tuple[int, float]]:
        """(index, damage) of each change over ``base`` (all weights), in the order of their cuts."""
        for i, outputs in self.suffixes.outputs(base, list(changes), self.run):
            yield i, self.damage_of(outputs)

    def measure(self, base: Weights, jobs: list[Job]) -> list[tuple[int, float]]:
        """Built jobs (a worker's call): (index, damage) of each."""
        changes = [(names, (lambda w=w: w)) for _, names, w in jobs]
        return [(jobs[k][0], d) for k, d in self.damages(base, changes)]


def run_batched(session, weights: Weights, outputs: list[str], feeds: dict[str, np.ndarray], batch: int,
                quiet: bool = False) -> list[np.ndarray]:
    """``outputs`` of ``session`` over all ``feeds``, run ``batch`` samples at a time, with
    ``weights`` fed. ``quiet``: a failure only raises (onnxruntime logs nothing)."""
    options = quiet_run() if quiet else None
    parts = [session.run(outputs, {**part, **weights}, options) for part in batches(feeds, batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]


class InProcess:
    """Jobs measured by the probe's own runner, one after another."""

    def __init__(self, runner: DamageRunner) -> None:
        self.runner = runner

    def damages(self, base: Weights, changes: Sequence[Change], done: Callable[[], None] | None) -> list[float]:
        out = [0.0] * len(changes)
        for i, d in self.runner.damages(base, changes):
            out[i] = d
            if done:
                done()
        return out

    def close(self) -> None:
        pass


def require_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--ray-address needs Ray: pip install 'onnxcc[ray]'") from None
    return ray


class RayPool:
    """Jobs measured by ``workers`` Ray actors (one CPU each), each holding a :class:`DamageRunner`.

    ``address``: ``local`` starts a Ray instance in this process (stopped on :meth:`close`),
    ``auto`` joins the cluster ``ray start`` runs here, ``HOST:PORT`` a remote one."""

    def __init__(self, spec: RunnerSpec, address: str, workers: int, cut: Callable[[Sequence[str]], int]) -> None:
        ray = self.ray = require_ray()
        self.started = not ray.is_initialized()
        if self.started:
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")   # no GPU is asked for: keep Ray quiet
            try:
                ray.init(address=None if address == "local" else address, num_cpus=workers if address == "local" else None,
                         include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                         runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}})
            except ConnectionError as e:
                raise UsageError(f"no Ray cluster at --ray-address {address}: {e}") from None
        self.cut = cut
        worker = ray.remote(num_cpus=1)(_Worker)
        ref = ray.put(spec)          # the graph and samples enter the object store once
        self.actors = [worker.remote(ref) for _ in range(workers)]
        log.info("measuring on %d Ray workers", workers)

    def damages(self, base: Weights, changes: Sequence[Change], done: Callable[[], None] | None) -> list[float]:
        ray = self.ray
        out = [0.0] * len(changes)
        order = sorted(range(len(changes)), key=lambda i: self.cut(changes[i][0]))
        calls = deque(order[k:k + JOBS_PER_CALL] for k in range(0, len(order), JOBS_PER_CALL))
        base_ref = ray.put(base)     # once per step, shared by every call
        running: dict = {}

        def submit(actor) -> None:
            if calls:
                jobs = [(i, changes[i][0], changes[i][1]()) for i in calls.popleft()]   # built here, when sent
                running[actor.measure.remote(base_ref, jobs)] = actor

        for actor in self.actors:
            for _ in range(2):   # one measuring, one waiting: a worker never idles on the driver
                submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            for i, d in ray.get(ready[0]):
                out[i] = d
                if done:
                    done()
            submit(actor)
        return out

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


class _Worker:
    """A Ray actor's state: one runner, built once from the spec in the object store."""

    def __init__(self, spec: RunnerSpec) -> None:
        self.runner = DamageRunner(spec)

    def measure(self, base: Weights, jobs: list[Job]) -> list[tuple[int, float]]:
        return self.runner.measure(base, jobs)


def _import_paths() -> list[str]:
    """Where this onnxcc is imported from, for workers started by a local Ray."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # above onnxcc/search/
    return [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
