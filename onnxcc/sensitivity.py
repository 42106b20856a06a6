"""Measure how much the network's outputs suffer when units are removed, with onnxruntime.

One session serves every candidate: the weights (and biases) of all compressible layers become
graph *inputs*, so a candidate is just a different feed. A pruning candidate zeroes the weights
that read the removed channels — numerically what the physical rewrite gives (see the exactness
tests) — and, where calibration statistics are known, refits the kept ones by least squares; a
low-rank candidate feeds the activation-aware rank-r weight. Damage is the relative squared
error of the outputs, judged as :mod:`onnxcc.outputs` says (logits, channels standardised).

Each measurement is an independent job (a feed dict in, a number out), so the loop can fan out;
candidates run from cached activations of the nodes they cannot change (:mod:`onnxcc.suffix`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .analysis.groups import Analysis, Layer
from .outputs import Standardizer
from .outputs import targets as output_targets
from .reconstruct import _ridge, moment_sums, refit, rows, whitener
from .runtime import expose_outputs, make_session
from .measure import DamageRunner, InProcess, RayPool, RunnerSpec, run_batched

log = logging.getLogger(__name__)

ROWS_PER_UNKNOWN = 4
MIN_REFIT_FRACTION = 0.05   # the smallest kept fraction a refit is planned for
RUN_BATCH = 8               # samples per onnxruntime run where the model's batch is dynamic
STAT_RUN_BYTES = 256 << 20  # layer inputs one statistics run may return (fewer samples per run where wider)


@dataclass
class Plan:
    """What to remove, in the analysed model's coordinates."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)   # group id -> kept-channel mask
    ranks: dict[str, int] = field(default_factory=dict)         # layer key -> SVD rank

    def copy(self) -> "Plan":
        return Plan({k: v.copy() for k, v in self.keep.items()}, dict(self.ranks))

    def kept(self) -> dict[int, int]:
        return {g: int(m.sum()) for g, m in self.keep.items()}


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
        """Measure candidates on Ray workers from now on (see :class:`onnxcc.measure.RayPool`)."""
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
        (here or on Ray workers: :mod:`onnxcc.measure`)."""
        views = [[self.views[k] for k in keys if k in self.views] for keys, _ in changes]
        names = [[w for v in vs for w in (v.weight, v.bias) if w] for vs in views]
        return self.measurer.damages({**self.original, **base}, [(n, b) for n, (_, b) in zip(names, changes)], done)

    def statistics(self, weights: dict[str, np.ndarray], full: set[str]) -> "Stats":
        """Per layer: E[p²] of every input column; the full second-moment matrix for ``full``.

        The samples stream through in runs of ``batch``: every layer's input for every sample at
        once (and the original's beside them) is what outgrew memory on big models, while each
        run's rows are the ones the whole set would give (:func:`rows` with a span)."""
        names = [self.inputs[k] for k in self.views]
        computed = [n for n in dict.fromkeys(names) if n not in self.stat_feeds]
        keys = [k for k, v in self.views.items() if v.layer.op != "ConvTranspose"]
        n = len(next(iter(self.stat_feeds.values())))
        sums = _MomentSums()
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


@dataclass
class Stats:
    energy: dict[str, np.ndarray] = field(default_factory=dict)    # layer key -> E[p²] per column
    moments: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # key -> (E[zzᵀ], E[tzᵀ])
    rows: dict[str, int] = field(default_factory=dict)             # layer key -> regression rows seen

    def moments_for(self, key: str, kept_columns: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Moments only where the rows clearly outnumber the unknowns: a classifier after global
        pooling sees one row per image, and a refit on 12 rows fits any 12 outputs exactly."""
        if self.rows.get(key, 0) < ROWS_PER_UNKNOWN * (kept_columns + 1):
            return None
        return self.moments.get(key)


class _MomentSums:
    """Sums of squares and second-moment products over streamed rows, per layer."""

    def __init__(self) -> None:
        self.energy: dict[str, np.ndarray] = {}
        self.products: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}   # key -> (Σ zzᵀ, Σ tzᵀ or None: t = z)
        self.rows: dict[str, int] = {}

    def add(self, key: str, r: np.ndarray, target: np.ndarray | None, moments: bool) -> None:
        sq = np.square(r).sum(0, dtype=np.float64)
        self.energy[key] = self.energy.get(key, 0.0) + sq
        self.rows[key] = self.rows.get(key, 0) + len(r)
        if moments:
            S, C = moment_sums(r, target)
            if key in self.products:   # in place: a wide layer's sums are hundreds of MB
                S0, C0 = self.products[key]
                S0 += S
                if C0 is not None:
                    C0 += C
            else:
                self.products[key] = (S, C)

    def stats(self) -> "Stats":
        """The means; moments only for layers whose rows clearly outnumber their unknowns (a refit
        needs ROWS_PER_UNKNOWN rows per kept column)."""
        stats = Stats()
        for key, total in self.rows.items():
            stats.rows[key] = total
            stats.energy[key] = self.energy[key] / max(total, 1)
            if key in self.products:
                S, C = self.products[key]
                if total >= ROWS_PER_UNKNOWN * (MIN_REFIT_FRACTION * (len(S) - 1) + 1):
                    S /= total   # in place: the sums are not used again
                    if C is not None:
                        C /= total
                    stats.moments[key] = (S, S if C is None else C)
        return stats


def plan_weights(probe: WeightProbe, plan: Plan, stats: Stats | None = None,
                 only: set[str] | None = None) -> dict[str, np.ndarray]:
    """Weights (and biases) that emulate ``plan`` inside the unmodified graph.

    Removed channels: reads zeroed (kept ones refit by least squares where ``stats`` has the
    layer's second moments). Ranks: activation-aware rank-r fit of the (refit) kept columns.
    With ``only`` (layer keys) just those layers are computed, and always returned, so they can
    overwrite a base plan's weights when a candidate changes a single unit.
    """
    a, stats = probe.analysis, stats or Stats()
    out: dict[str, np.ndarray] = {}
    for key, v in probe.views.items():
        if only is not None and key not in only:
            continue
        W = probe.original[v.weight]
        b = probe.original[v.bias] if v.bias else None
        layer = v.layer
        in_m = a.mask(v.node.inputs[0].name, plan.keep) if layer.red_layout is not None else None
        out_m = a.mask(key, plan.keep) if layer.group == 1 else None
        in_m = None if in_m is None or in_m.all() else in_m
        out_m = None if out_m is None or out_m.all() else out_m
        rank = plan.ranks.get(key)
        if in_m is None and out_m is None and rank is None:
            if only is not None:
                out[v.weight] = W
                if v.bias:
                    out[v.bias] = b
            continue
        if layer.op == "ConvTranspose":
            W = W.copy()
            if in_m is not None:
                W[~in_m] = 0
            out[v.weight] = W
            continue
        Wm = v.matrix(W)
        cols = np.ones(Wm.shape[1], bool) if in_m is None else np.repeat(in_m, v.taps)
        # a shared weight is one tensor for every reader: a refit to one reader's inputs would
        # be wrong for the others
        moments = None if layer.shared else stats.moments_for(key, int(cols.sum()))
        S = moments[0] if moments is not None else None
        if in_m is not None and moments is not None:
            Wm, b = refit(Wm, b.astype(np.float64) if b is not None else None, *moments, cols)
        else:
            Wm[:, ~cols] = 0
        if out_m is not None:
            Wm[~out_m] = 0
        if rank is not None and cols.any() and (out_m is None or out_m.any()):   # else the layer folds away
            Wm = _low_rank(probe, key, Wm, cols, rank, S, stats.energy.get(key), in_m, out_m)
        out[v.weight] = v.native(Wm, W)
        if v.bias:
            out[v.bias] = np.asarray(b, probe.original[v.bias].dtype)
    return out


def _low_rank(probe: WeightProbe, key: str, Wm: np.ndarray, cols: np.ndarray, rank: int,
              S: np.ndarray | None, energy: np.ndarray | None, in_m, out_m) -> np.ndarray:
    """Activation-aware rank-r fit: full whitening where moments are known, else diagonal.

    The SVD depends on the layer and its pruning masks, not on the rank, so it is cached: the
    candidates of one step probe several ranks of the same matrix."""
    Wk = Wm[:, cols]
    tag = (key, S is not None) + tuple(None if m is None else np.packbits(m).tobytes() for m in (in_m, out_m))
    if S is not None:
        U, _, _ = probe.svd(tag, Wk @ whitener(S, cols))
    else:
        scale = np.sqrt(energy[cols] + 1e-12) if energy is not None else np.ones(cols.sum())
        U, _, _ = probe.svd(tag, Wk * scale)
    Ur = U[:, :rank].astype(np.float64)
    out = np.zeros_like(Wm)
    out[:, cols] = Ur @ (Ur.T @ Wk)
    return out


def affected_layers(analysis: Analysis, unit: str | int) -> set[str]:
    """Layer keys whose emulated weight depends on a unit (a group id or a layer key)."""
    if isinstance(unit, str):
        return {unit}
    return {l.key for l in analysis.layers if unit in l.in_groups or unit in l.out_groups}


OBS_MAX_COLUMNS = 1536   # wider readers fall back to the diagonal score (the inverse is cubic)


@dataclass
class _Reader:
    """One layer that reduces over a group's channels: its current weight (Cout × D), the inverse
    of its kept input columns' second moments (None: diagonal fallback) and, per channel of the
    group, the indices of its columns (in the kept-columns numbering when ``Sinv`` is known)."""

    W: np.ndarray
    Sinv: np.ndarray | None
    energy: np.ndarray | None
    columns: dict[int, np.ndarray]


def channel_scores(probe: WeightProbe, plan: Plan, weights: dict[str, np.ndarray],
                   stats: Stats, batch: int = 16) -> dict[int, np.ndarray]:
    """Per group, per channel: the order in which channels go (lowest first; inf once removed).

    Channels are removed greedily by the output error their removal costs *after* the reading
    layers refit the rest — Optimal Brain Surgeon on column blocks: removing the columns B of a
    layer with weight W and input moments S costs ``tr(W_B (S⁻¹_BB)⁻¹ W_Bᵀ)``, and W and S⁻¹
    are updated so the next choice sees the refit. A channel that others can stand in for goes
    early even when its weights are large. Readers without moments (too few calibration rows)
    or too wide for the inverse use the diagonal form ``‖W[:, c]‖²·E[x_c²]``. ``batch`` channels
    go per update."""
    a = probe.analysis
    readers: dict[int, list[_Reader]] = {gid: [] for gid, g in a.groups.items() if g.prunable}
    for key, v in probe.views.items():
        layer = v.layer
        if layer.red_layout is None or layer.op == "ConvTranspose":
            continue
        W = v.matrix(weights.get(v.weight, probe.original[v.weight]))
        in_m = a.mask(v.node.inputs[0].name, plan.keep)
        cols = np.ones(W.shape[1], bool) if in_m is None else np.repeat(in_m, v.taps)
        moments = stats.moments_for(key, int(cols.sum()))
        Sinv = None
        if moments is not None and cols.sum() <= OBS_MAX_COLUMNS:
            kp = np.append(cols, True)    # the bias column always stays
            Sinv = np.linalg.inv(_ridge(moments[0][np.ix_(kp, kp)]))
        renum = np.cumsum(cols) - 1       # column -> index among kept columns
        gids, chans = index_map(a, layer.red_layout)
        for gid in np.unique(gids):
            if gid not in readers:
                continue
            columns = {}
            for c in np.unique(chans[gids == gid]):
                pos = np.flatnonzero((gids == gid) & (chans == c))
                idx = (pos[:, None] * v.taps + np.arange(v.taps)).ravel()
                idx = idx[cols[idx]]
                if len(idx):
                    columns[int(c)] = renum[idx] if Sinv is not None else idx
            if columns:
                readers[gid].append(_Reader(W[:, cols].copy() if Sinv is not None else W,
                                            Sinv, stats.energy.get(key), columns))
    scores = {}
    for gid, rs in readers.items():
        live = plan.keep.get(gid, np.ones(a.groups[gid].size, bool))
        scores[gid] = _greedy_order(rs, live, batch)
    return scores


def _greedy_order(readers: list[_Reader], live: np.ndarray, batch: int) -> np.ndarray:
    order = np.full(len(live), np.inf)
    alive = [int(c) for c in np.flatnonzero(live)]
    static = np.zeros(len(live))
    for r in readers:
        if r.Sinv is None:
            for c, idx in r.columns.items():
                e = r.energy[idx] if r.energy is not None and len(r.energy) == r.W.shape[1] else 1.0
                static[c] += float(((r.W[:, idx] ** 2).sum(0) * e).sum())
    rank = 0
    while alive:
        cost = static[alive].copy()
        for r in (r for r in readers if r.Sinv is not None):
            for i, c in enumerate(alive):
                idx = r.columns.get(c)
                if idx is not None:
                    cost[i] += _obs_cost(r, idx)
        take = [alive[i] for i in np.argsort(cost, kind="stable")[:batch]]
        for c in take:
            order[c] = rank
            rank += 1
        gone = set(take)
        alive = [c for c in alive if c not in gone]
        if alive:
            for r in (r for r in readers if r.Sinv is not None):
                idx = [r.columns[c] for c in take if c in r.columns]
                if idx:
                    _obs_remove(r, np.concatenate(idx))
    return order


def _obs_cost(r: _Reader, idx: np.ndarray) -> float:
    """Output error of removing columns ``idx`` with the other columns refit optimally."""
    Wb = r.W[:, idx]
    if len(idx) == 1:
        return float((Wb ** 2).sum() / max(r.Sinv[idx[0], idx[0]], 1e-30))
    return float(np.sum(Wb * np.linalg.solve(r.Sinv[np.ix_(idx, idx)], Wb.T).T))


def _obs_remove(r: _Reader, idx: np.ndarray) -> None:
    """Remove columns ``idx``: refit the rest (W -= W_B M S⁻¹_B:) and condition S⁻¹ on it."""
    M = np.linalg.inv(r.Sinv[np.ix_(idx, idx)])
    rows = r.Sinv[idx]                                  # |B| × (D+1)
    r.W -= (r.W[:, idx] @ M) @ rows[:, :-1]
    r.Sinv -= rows.T @ M @ rows
    r.W[:, idx] = 0.0


def index_map(a: Analysis, layout) -> tuple[np.ndarray, np.ndarray]:
    """For each position of a layout's expanded axis: (group id, channel index in that group)."""
    gids, chans = [], []
    for atom in a.atoms.expand(layout.atoms):
        size = a.atoms.size[atom]
        gids.append(np.full(size, a.atoms.find(atom)))
        chans.append(np.arange(size))
    g = np.tile(np.repeat(np.concatenate(gids), layout.inner), layout.outer)
    c = np.tile(np.repeat(np.concatenate(chans), layout.inner), layout.outer)
    return g, c
