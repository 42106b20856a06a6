"""Measure how much the network's outputs suffer when units are removed, with onnxruntime.

One session serves every candidate: the weights of all MAC-bearing layers become graph
*inputs*, so a candidate is just a different feed. A pruning candidate zeroes the weights that
read the removed channels (numerically what the physical rewrite gives — see the exactness
tests); a low-rank candidate feeds the truncated-SVD weight. Damage is the relative squared
error of the outputs (the logits when an output comes from Softmax/Sigmoid) on calibration data.

Each measurement is an independent job (a feed dict in, a number out), so the loop can fan out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx

from .analysis.groups import Analysis, Layer
from .runtime import expose_outputs, make_session

log = logging.getLogger(__name__)

SATURATING = ("Softmax", "LogSoftmax", "Sigmoid")


@dataclass
class Plan:
    """What to remove, in the analysed model's coordinates."""

    keep: dict[int, np.ndarray] = field(default_factory=dict)   # group id -> kept-channel mask
    ranks: dict[str, int] = field(default_factory=dict)         # layer key -> SVD rank

    def copy(self) -> "Plan":
        return Plan({k: v.copy() for k, v in self.keep.items()}, dict(self.ranks))

    def kept(self) -> dict[int, int]:
        return {g: int(m.sum()) for g, m in self.keep.items()}


def damage_targets(model: onnx.ModelProto) -> list[str]:
    """Tensors to compare: each graph output, or its logits when it is a Softmax/Sigmoid."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for o in model.graph.output:
        n = producers.get(o.name)
        out.append(n.input[0] if n is not None and n.op_type in SATURATING else o.name)
    return out


class WeightProbe:
    """An onnxruntime session of the model with every layer weight fed as an input."""

    def __init__(self, analysis: Analysis, model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                 provider: str = "cpu", threads: int = 0, batched: bool = True) -> None:
        self.analysis = analysis
        self.layers = [l for l in analysis.layers if l.compressible and self._weight(l) is not None]
        self.weight_name = {l.key: self._weight(l) for l in self.layers}
        names = set(self.weight_name.values())
        inits = {i.name: i for i in model.graph.initializer}
        self.original = {n: onnx.numpy_helper.to_array(inits[n]) for n in names}
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        kept_inits = [i for i in probe.graph.initializer if i.name not in names]
        del probe.graph.initializer[:]
        probe.graph.initializer.extend(kept_inits)
        for n in sorted(names):
            t = inits[n]
            probe.graph.input.append(onnx.helper.make_tensor_value_info(n, t.data_type, list(t.dims)))
        self.targets = damage_targets(model)
        inputs = {l.key: self._input_of(l) for l in self.layers}
        self.model = expose_outputs(probe, self.targets + list(inputs.values()))
        self.session = make_session(self.model, provider, threads)
        self.feeds = feeds
        self.batched = batched
        self.reference = self._run(self.original, self.targets)

    def _weight(self, layer: Layer) -> str | None:
        node = next(n for n in self.analysis.view.nodes if n.outputs[0].name == layer.key)
        w = node.inputs[1]
        return w.name if self.analysis.view.const(w) is not None and w.name in self.analysis.view.graph.tensors() else None

    def _run(self, weights: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if self.batched:
            return self.session.run(outputs, {**self.feeds, **weights})
        n = len(next(iter(self.feeds.values())))
        rows = [self.session.run(outputs, {**{k: v[i:i + 1] for k, v in self.feeds.items()}, **weights})
                for i in range(n)]
        return [np.concatenate([r[j] for r in rows]) for j in range(len(outputs))]

    def damage(self, weights: dict[str, np.ndarray]) -> float:
        outs = self._run({**self.original, **weights}, self.targets)
        errs = [float(np.sum((o.astype(np.float64) - r) ** 2) / (np.sum(r.astype(np.float64) ** 2) + 1e-30))
                for o, r in zip(outs, self.reference)]
        return float(np.mean(errs))

    def input_energy(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Mean square of each layer's input along its reduction axis (per input position)."""
        names = list(dict.fromkeys(self._input_of(l) for l in self.layers))
        computed = [n for n in names if n not in self.feeds]
        values = dict(zip(computed, self._run({**self.original, **weights}, computed)))
        values.update({n: self.feeds[n] for n in names if n in self.feeds})
        energy = {}
        for name, x in values.items():
            x = x.astype(np.float64) ** 2
            axis = 1 if x.ndim > 2 and self._is_conv_input(name) else x.ndim - 1
            energy[name] = x.mean(axis=tuple(i for i in range(x.ndim) if i != axis))
        return energy

    def _input_of(self, layer: Layer) -> str:
        node = next(n for n in self.analysis.view.nodes if n.outputs[0].name == layer.key)
        return node.inputs[0].name

    def _is_conv_input(self, name: str) -> bool:
        return any(n.op in ("Conv", "ConvTranspose") and n.inputs[0].name == name for n in self.analysis.view.nodes)


def plan_weights(probe: WeightProbe, plan: Plan) -> dict[str, np.ndarray]:
    """Weights that emulate ``plan`` inside the unmodified graph (zeroed reads, low-rank fits)."""
    a = probe.analysis
    out = {}
    for layer in probe.layers:
        name = probe.weight_name[layer.key]
        W = probe.original[name]
        node_in = probe._input_of(layer)
        in_m = a.mask(node_in, plan.keep) if layer.red_layout is not None else None
        out_m = a.mask(layer.key, plan.keep)
        rank = plan.ranks.get(layer.key)
        if (in_m is None or in_m.all()) and (out_m is None or out_m.all()) and rank is None:
            continue
        W = W.copy()
        read_axis, write_axis = _axes(layer, probe, W)
        if in_m is not None and not in_m.all():
            W = _zero(W, ~in_m, read_axis)
        if out_m is not None and not out_m.all() and write_axis is not None and layer.group == 1:
            W = _zero(W, ~out_m, write_axis)
        if rank is not None:
            W = low_rank(W, rank)
        out[name] = W
    return out


def low_rank(W: np.ndarray, rank: int) -> np.ndarray:
    Wm = W.reshape(W.shape[0], -1).astype(np.float64)
    U, S, Vt = np.linalg.svd(Wm, full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vt[:rank]).reshape(W.shape).astype(W.dtype)


def _axes(layer: Layer, probe: WeightProbe, W: np.ndarray) -> tuple[int, int | None]:
    """(axis of W that reads input channels, axis that writes output channels)."""
    if layer.op == "Conv":
        return 1, 0
    if layer.op == "ConvTranspose":
        return 0, 1
    node = next(n for n in probe.analysis.view.nodes if n.outputs[0].name == layer.key)
    if layer.op == "Gemm" and node.attrs.get("transB", 0):
        return 1, 0
    return 0, 1


def _zero(W: np.ndarray, drop: np.ndarray, axis: int) -> np.ndarray:
    idx = [slice(None)] * W.ndim
    idx[axis] = drop
    W[tuple(idx)] = 0
    return W


def channel_scores(probe: WeightProbe, plan: Plan, weights: dict[str, np.ndarray],
                   energy: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """Per group, per channel: Σ over reading layers of ‖W[:, c]‖² · E[x_c²] (inf once removed).

    This is the diagonal (per-input-channel) approximation of the layers' output error that the
    CC notes derive as substitute A for the training-set gradient."""
    a = probe.analysis
    scores = {gid: np.zeros(g.size) for gid, g in a.groups.items() if g.prunable}
    for layer in probe.layers:
        if layer.red_layout is None:
            continue
        name = probe.weight_name[layer.key]
        W = weights.get(name, probe.original[name]).astype(np.float64)
        read_axis, _ = _axes(layer, probe, W)
        col = (np.moveaxis(W, read_axis, 0) ** 2).reshape(W.shape[read_axis], -1).sum(1)
        e = energy.get(probe._input_of(layer))
        if e is not None and len(e) == len(col):
            col = col * e
        gids, chans = index_map(a, layer.red_layout)
        for gid in np.unique(gids):
            if gid in scores:
                sel = gids == gid
                np.add.at(scores[gid], chans[sel], col[sel])
    for gid, m in plan.keep.items():
        scores[gid][~m] = np.inf
    return scores


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
