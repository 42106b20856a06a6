"""The probe: how much the network's outputs suffer under other weights, with onnxruntime.

One session serves every candidate: the weights (and biases) of all compressible layers become
graph *inputs*, so a candidate is just a different feed (:mod:`.emulation` makes the feeds).
Damage is the relative squared error of the outputs, judged as :mod:`onnxcc.outputs` says
(logits, channels standardised). Each measurement is an independent job (:mod:`.jobs`: here or
on Ray workers); candidates run from cached activations of the nodes they cannot change
(:mod:`.suffix`). The probe also streams the layer-input statistics (:mod:`.statistics`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..analysis.groups import Analysis, Layer
from ..outputs import Standardizer
from ..outputs import targets as output_targets
from ..runtime import expose_outputs, make_session
from .jobs import DamageRunner, InProcess, RayPool, RunnerSpec, run_batched
from .refit import rows
from .statistics import MomentSums, Stats

log = logging.getLogger(__name__)

RUN_BATCH = 8               # samples per onnxruntime run where the model's batch is dynamic
STAT_RUN_BYTES = 256 << 20  # layer inputs one statistics run may return (fewer samples per run where wider)


@dataclass
class LayerView:
    """A layer's weight seen as a Cout × D matrix whose columns read input positions."""

    layer: Layer
    node: gs.Node
    weight: str
    bias: str | None
    taps: int          # columns per input position (k·k for Conv, 1 for Gemm/MatMul)
    transposed: bool   # stored as D × Cout (Gemm without transB, MatMul)

    def matrix(self, W: np.ndarray) -> np.ndarray:
        if self.layer.op == "ConvTranspose":
            raise ValueError("ConvTranspose has no reading-matrix view")
        return W.T.astype(np.float64) if self.transposed else W.reshape(W.shape[0], -1).astype(np.float64)

    def native(self, Wm: np.ndarray, like: np.ndarray) -> np.ndarray:
        return (Wm.T if self.transposed else Wm.reshape(like.shape)).astype(like.dtype)


def _view(analysis: Analysis, layer: Layer) -> LayerView | None:
    node = next(n for n in analysis.view.nodes if n.outputs[0].name == layer.key)
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        return None
    b = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
    cout = layer.cout
    if b is not None and (np.asarray(b.values).ndim != 1 or np.asarray(b.values).shape[0] != cout):
        b = None  # broadcast Gemm C: leave it alone
    taps = int(np.prod(w.shape[2:])) if layer.op in ("Conv", "ConvTranspose") else 1
    transposed = layer.op == "MatMul" or (layer.op == "Gemm" and not node.attrs.get("transB", 0))
    return LayerView(layer, node, w.name, b.name if b is not None else None, taps, transposed)


class WeightProbe:
    """An onnxruntime session of the model with every layer weight and bias fed as an input."""

    def __init__(self, analysis: Analysis, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 provider: str = "cpu", threads: int = 0, batched: bool = True,
                 stat_feeds: dict[str, np.ndarray] | None = None) -> None:
        self.analysis = analysis
        views = [_view(analysis, l) for l in analysis.layers if l.compressible]
        self.views = {v.layer.key: v for v in views if v is not None}
        self.layers = [v.layer for v in self.views.values()]
        names = {v.weight for v in self.views.values()} | {v.bias for v in self.views.values() if v.bias}
        inits = {i.name: i for i in model.graph.initializer}
        self.original = {n: onnx.numpy_helper.to_array(inits[n]) for n in names}
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        kept_inits = [i for i in probe.graph.initializer if i.name not in names]
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(kept_inits)
        declared = {i.name for i in probe.graph.input}   # IR < 4 lists initializers as inputs too
        for n in sorted(names - declared):
            t = inits[n]
            probe.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
        self.targets = [t.tensor for t in output_targets(model)]
        self.inputs = {k: v.node.inputs[0].name for k, v in self.views.items()}
        self.model = expose_outputs(probe, self.targets + list(self.inputs.values()))
        self.session = make_session(self.model, provider, threads)
        self.feeds = feeds
        self.stat_feeds = stat_feeds if stat_feeds is not None else feeds
        self.batch = RUN_BATCH if batched else 1
        reference = self._reference_outputs()
        shapes = analysis.view.shapes   # one sample's; float32 is close enough to size the cache
        # the original outputs, each kept (standardised) by the comparison it serves
        self.spec = RunnerSpec(b"", feeds, self.targets, [Standardizer(r) for r in reference],
                               {t: 4 * int(np.prod(s)) for t, s in shapes.items() if s is not None},
                               self.batch, provider, threads)
        self.runner = DamageRunner(self.spec, self.model, self.session)
        # statistics runs return every layer's input, twice where the original's are wanted too: a
        # 16-GMAC detector at 576×576 returns 133 MB of them per sample
        inputs = sum(self.spec.sample_bytes.get(t, 0) for t in set(self.inputs.values()))
        self.stat_batch = int(np.clip(STAT_RUN_BYTES // max(inputs, 1), 1, self.batch))
        self.measurer: InProcess | RayPool = InProcess(self.runner)
        self._svd_cache: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def on_ray(self, address: str, workers: int) -> None:
        """Measure candidates on Ray workers from now on (see :class:`.jobs.RayPool`)."""
        spec = replace(self.spec, model=self.model.SerializeToString())
        self.measurer = RayPool(spec, address, workers, self.runner.suffixes.cut)

    def close(self) -> None:
        self.measurer.close()

    def _reference_outputs(self) -> list[np.ndarray]:
        """The original outputs. Batched runs are kept only where they give what single samples
        give: a dynamic batch axis can meet a batch fixed inside the graph (a Reshape to
        [1, -1], an RNN state held as a constant of batch 1), which fails or, worse, mixes samples."""
        if self.batch == 1:
            return self._run(self.original, self.targets)
        n = len(next(iter(self.feeds.values())))
        k = min(self.batch, n)
        single = self._run(self.original, self.targets, {name: v[:k] for name, v in self.feeds.items()}, 1)
        try:
            batched = self._run(self.original, self.targets, quiet=True)
            if all(b.shape[1:] == s.shape[1:] and len(b) == n and
                   np.allclose(b[:k], s, rtol=1e-3, atol=1e-4 * (np.abs(s).max() + 1e-30))
                   for b, s in zip(batched, single)):
                return batched
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types
            log.info("batched runs fail: %s", str(e).splitlines()[0][:200])
        log.info("running one sample at a time: batches of %d do not reproduce single runs", self.batch)
        self.batch = 1
        if k == n:
            return single
        rest = self._run(self.original, self.targets, {name: v[k:] for name, v in self.feeds.items()})
        return [np.concatenate([s, r]) for s, r in zip(single, rest)]

    def _run(self, weights: dict[str, np.ndarray], outputs: list[str],
             feeds: dict[str, np.ndarray] | None = None, batch: int | None = None,
             quiet: bool = False) -> list[np.ndarray]:
        """``quiet``: a failure only raises (onnxruntime logs nothing), for runs allowed to fail."""
        return run_batched(self.session, weights, outputs, self.feeds if feeds is None else feeds,
                           self.batch if batch is None else batch, quiet)

    def outputs(self, weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._run({**self.original, **weights}, self.targets)

    def damage(self, weights: dict[str, np.ndarray]) -> float:
        return self.runner.damage_of(self.outputs(weights))

    def damages(self, base: dict[str, np.ndarray], changes: list[tuple[set[str], Callable[[], dict]]],
                done: Callable[[], None] | None = None) -> list[float]:
        """Damage of ``{**base, **build()}`` for each (layer keys, build) in ``changes``; only the
        nodes from the first changed layer on are run, from cached activations under ``base``
        (here or on Ray workers: :mod:`.jobs`)."""
        views = [[self.views[k] for k in keys if k in self.views] for keys, _ in changes]
        names = [[w for v in vs for w in (v.weight, v.bias) if w] for vs in views]
        return self.measurer.damages({**self.original, **base}, [(n, b) for n, (_, b) in zip(names, changes)], done)

    def statistics(self, weights: dict[str, np.ndarray], full: set[str]) -> Stats:
        """Per layer: E[p²] of every input column; the full second-moment matrix for ``full``.

        The samples stream through in runs of ``batch``: every layer's input for every sample at
        once (and the original's beside them) is what outgrew memory on big models, while each
        run's rows are the ones the whole set would give (:func:`rows` with a span)."""
        names = [self.inputs[k] for k in self.views]
        computed = [n for n in dict.fromkeys(names) if n not in self.stat_feeds]
        keys = [k for k, v in self.views.items() if v.layer.op != "ConvTranspose"]
        n = len(next(iter(self.stat_feeds.values())))
        sums = MomentSums()
        for first in range(0, n, self.stat_batch):
            part = {k: v[first:first + self.stat_batch] for k, v in self.stat_feeds.items()}
            acts = dict(zip(computed, self._run({**self.original, **weights}, computed, part)))
            acts.update({name: part[name] for name in names if name in part})
            # under the original weights the original's rows are these rows: no second run (t = z)
            orig = dict(zip(computed, self._run(self.original, computed, part))) if full and weights else {}
            for key in keys:
                name, node = self.inputs[key], self.views[key].node
                r = rows(np.asarray(acts[name]), node, span=(first, n))
                if r is not None:
                    target = (rows(np.asarray(orig[name]), node, span=(first, n)) if key in full and name in orig
                              else None)
                    sums.add(key, r, target, key in full)
        return sums.stats()

    def forget_svds(self) -> None:
        self._svd_cache.clear()

    def svd(self, key: tuple, Wm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if key not in self._svd_cache:
            if len(self._svd_cache) > 512:
                self._svd_cache.clear()
            self._svd_cache[key] = np.linalg.svd(Wm.astype(np.float32), full_matrices=False)
        return self._svd_cache[key]
