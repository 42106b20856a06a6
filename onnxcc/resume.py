"""What a compress run has measured, kept on disk so that a killed run resumes where it stopped.

A :class:`SearchCheckpoint` is a folder (the CLI's ``OUTPUT.search/``) holding:

- ``run.json``: a fingerprint of what decides the plan (the model, the calibration samples, the
  settings), and the measurements of this machine the search priced with (the channel multiple,
  the latency reference and the whole model's measured time), so that a resumed run prices
  exactly as the killed one did;
- ``try{t}-step{s}.npz``: the plan, damage curves and emulated weights after each finished step
  of each search, with the search's seconds so far (each file replaced atomically).

A resumed run reads the finished steps back and measures only from the first missing one, so it
ends with the plan an uninterrupted run with the same measurements ends with.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from .errors import UsageError
from .io import atomic_write_text
from .search.plan import Plan

RUN = "run.json"


def fingerprint(model: onnx.ModelProto, samples: dict[str, np.ndarray], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    for name in sorted(samples):
        h.update(name.encode())
        h.update(np.ascontiguousarray(samples[name]).tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


class SearchCheckpoint:
    """The checkpoint folder of one run: written as the search goes, read back with ``resume``."""

    def __init__(self, folder: str | os.PathLike, key: str, resume: bool = False) -> None:
        self.folder = Path(folder)
        run = self.folder / RUN
        if resume:
            if not run.is_file():
                raise UsageError(f"nothing to resume: no checkpoint in {self.folder}/ (run without --resume)")
            self.run = json.loads(run.read_text())
            if self.run.get("fingerprint") != key:
                raise UsageError(f"the checkpoint in {self.folder}/ is of another model, calibration or settings: "
                                 "run without --resume to start over")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.run = {"fingerprint": key, "measured": {}}
            self._save_run()

    def measured(self, name: str, measure: Callable[[], Any]) -> Any:
        """A measurement of this machine the plan depends on: the checkpoint's where it has one."""
        if name not in self.run["measured"]:
            self.run["measured"][name] = measure()
            self._save_run()
        return self.run["measured"][name]

    def steps_of(self, search: int) -> "SearchSteps":
        """The finished steps of one search, as :func:`onnxcc.search.search_plan` keeps them."""
        return SearchSteps(self, search)

    def step(self, search: int, step: int) -> tuple[Plan, dict, dict[str, np.ndarray], float] | None:
        """A finished step read back (plan, curves, weights, the search's seconds until then), or None."""
        path = self._step_path(search, step)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            keep = {int(g): z[f"keep/{g}"] for g in meta["groups"]}
            weights = {name: z[f"weight/{i}"] for i, name in enumerate(meta["weights"])}
        return Plan(keep, {k: int(r) for k, r in meta["ranks"].items()}), meta["curves"], weights, meta["seconds"]

    def save_step(self, search: int, step: int, plan: Plan, curves: dict, weights: dict[str, np.ndarray],
                  seconds: float) -> None:
        meta = {"groups": [str(g) for g in plan.keep], "ranks": plan.ranks, "weights": list(weights),
                "curves": _plain(curves), "seconds": seconds}
        arrays = {"meta": np.array(json.dumps(meta)), **{f"keep/{g}": m for g, m in plan.keep.items()},
                  **{f"weight/{i}": w for i, w in enumerate(weights.values())}}
        path = self._step_path(search, step)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _step_path(self, search: int, step: int) -> Path:
        return self.folder / f"try{search}-step{step}.npz"

    def _save_run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / RUN, json.dumps(self.run, indent=1))


class SearchSteps:
    """One search's finished steps, and the seconds it has taken across runs (the first search's
    time decides whether more are made, so a resumed run must count the killed run's too)."""

    def __init__(self, checkpoint: SearchCheckpoint, search: int) -> None:
        self.checkpoint, self.search = checkpoint, search
        self.started, self.before = time.perf_counter(), 0.0

    def step(self, step: int) -> tuple[Plan, dict, dict[str, np.ndarray]] | None:
        saved = self.checkpoint.step(self.search, step)
        if saved is None:
            return None
        *found, self.before = saved
        return tuple(found)

    def save_step(self, step: int, plan: Plan, curves: dict, weights: dict[str, np.ndarray]) -> None:
        self.checkpoint.save_step(self.search, step, plan, curves, weights, self.seconds())

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started


def _plain(value: Any) -> Any:
    """Curves as JSON: numpy scalars and arrays become numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def checkpoint_folder(output: str | os.PathLike) -> Path:
    """Where ``onnxcc compress -o OUTPUT`` keeps what it measured until OUTPUT is written."""
    return Path(str(output) + ".search")


__all__ = ["SearchCheckpoint", "checkpoint_folder", "fingerprint"]
