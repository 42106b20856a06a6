"""Re-run only the part of a graph that changed weights can reach.

A sensitivity candidate changes the weights of a few layers; every node before the first of them
computes exactly what it computed under the step's base weights. The tensors that cross such a
cut are cached from one run of the nodes before it (one run serves as many cuts as the cache
holds) and a session of the nodes from the cut on computes the outputs: measuring open-nsfw's
candidates takes about half the time of whole runs.

The candidates of one unit change the same weights, so they share one suffix session in which
every other weight is a constant holding its base value: onnxruntime prepacks constant Conv
weights and runs them in its blocked (NCHWc) layout, which it cannot do for a weight fed as an
input.

Models whose ops carry subgraphs (If/Loop/Scan read outer-scope tensors that the cut analysis
does not see) are always run whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx

from ..runtime import make_session

CACHE_BYTES = 768 << 20     # cut tensors held at once (every calibration sample)
Weights = dict[str, np.ndarray]
RunWhole = Callable[[Weights, list[str]], list[np.ndarray]]   # (weights, outputs) -> outputs over all samples


def batches(feeds: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """``feeds`` cut into runs of ``size`` samples (the last may be shorter)."""
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


@dataclass
class _Suffix:
    """A session of the nodes from a cut on: what it outputs, and what it is fed."""

    session: object
    outs: list[str]       # the targets computed after the cut
    crossing: list[str]   # tensors from before the cut
    fed: list[str]        # the weights the candidates change


class SuffixRunner:
    """Target outputs of weight changes, each computed from the first node its weights feed."""

    def __init__(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], targets: list[str],
                 sample_bytes: Callable[[str], int], batch: int, provider: str = "cpu",
                 threads: int = 0) -> None:
        g = model.graph
        self.model, self.feeds, self.targets = model, feeds, targets
        self.provider, self.threads, self.batch = provider, threads, batch
        self.nodes = list(g.node)
        self.enabled = not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                               for n in self.nodes for a in n.attribute)
        self.initializers = {i.name: i for i in g.initializer}
        self.graph_inputs = {i.name: i for i in g.input}
        self.produced = {name: -1 for name in feeds}          # tensor -> index of its node (-1: fed)
        self.first_use: dict[str, int] = {}
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for t in n.input:
                if t:
                    self.first_use.setdefault(t, i)
                    self.last_use[t] = i
            for t in n.output:
                self.produced[t] = i
        self.sample_bytes = sample_bytes
        self._sessions: dict[tuple, tuple[object, list[str], list[str]]] = {}

    def cut(self, changed: Sequence[str]) -> int:
        """Index of the first node that reads any of the ``changed`` inputs."""
        return min((self.first_use[n] for n in changed if n in self.first_use), default=0)

    def boundary(self, cut: int) -> list[str]:
        """Tensors computed before ``cut`` that nodes from ``cut`` on, or the outputs, need."""
        crossing = [t for t, p in self.produced.items() if p < cut and self.last_use.get(t, -1) >= cut]
        done = [t for t in self.targets if self.produced.get(t, cut) < cut and t not in crossing]
        return crossing + done

    def outputs(self, base: Weights, changes: list[tuple[Sequence[str], Callable[[], Weights]]],
                run_whole: RunWhole) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(index into ``changes``, target outputs) for every change, in the order of their cuts.

        A change is (names of the inputs it changes, a function building its weights); its
        outputs are those of ``{**base, **weights}``. Changes of the first node are run whole."""
        cuts = [self.cut(names) if self.enabled else 0 for names, _ in changes]
        changed = [tuple(sorted(names)) for names, _ in changes]
        order = sorted(range(len(changes)), key=lambda i: (cuts[i], changed[i]))
        for chunk in self._chunks(sorted({c for c in cuts if c > 0})):
            cache = self._crossing(chunk, base)
            for c in chunk:
                here = [i for i in order if cuts[i] == c]
                for names, group in groupby(here, key=changed.__getitem__):
                    suffix = self._suffix(c, set(names), base, cache[0])
                    for i in group:
                        yield i, self._outputs_from(suffix, cache, {**base, **changes[i][1]()})
        for i in (i for i in order if cuts[i] == 0):
            yield i, run_whole({**base, **changes[i][1]()}, self.targets)

    def _chunks(self, cuts: list[int]) -> Iterator[list[int]]:
        """Consecutive cuts whose crossing tensors (all samples) fit in the cache together."""
        n = len(next(iter(self.feeds.values())))
        chunk, held = [], set()
        for c in cuts:
            more = held | set(self.boundary(c))
            if chunk and sum(self.sample_bytes(t) for t in more) * n > CACHE_BYTES:
                yield chunk
                chunk, more = [], set(self.boundary(c))
            chunk.append(c)
            held = more
        if chunk:
            yield chunk

    def _crossing(self, chunk: list[int], base: Weights) -> list[dict[str, np.ndarray]]:
        """Per batch of samples: the tensors crossing the chunk's cuts under ``base``, from the
        nodes before its last cut. Kept per batch: shape tensors and scalars have no batch axis."""
        names = list(dict.fromkeys(t for c in chunk for t in self.boundary(c)))
        wanted = [t for t in names if t not in self.feeds]
        return [{**feeds, **dict(zip(wanted, self._prefix(max(chunk), wanted, base, feeds)))}
                for feeds in batches(self.feeds, self.batch)]

    def _suffix(self, cut: int, changed: set[str], base: Weights, values: dict[str, np.ndarray]) -> _Suffix:
        """A session of the nodes from ``cut`` on, with the weights not ``changed`` fixed at ``base``."""
        nodes = self.nodes[cut:]
        outs = [t for t in self.targets if self.produced.get(t, -1) >= cut]
        used, weights = self._reads(nodes)
        crossing = [t for t in used if t in self.produced and self.produced[t] < cut]
        fed = [t for t in weights if t in changed]
        constants = [self.initializers[t] for t in used if t in self.initializers]
        constants += [onnx.numpy_helper.from_array(np.asarray(base[t]), t) for t in weights if t not in changed]
        inputs = [_value_info(t, values[t]) for t in crossing] + [self.graph_inputs[t] for t in fed]
        # Level "all" can drop a Conv output that is also a graph output when the Conv's weight is
        # an input (onnxruntime 1.32): only constant-weight layers may end in one here
        risky = any(n.output[0] in outs and any(t in changed for t in n.input) for n in nodes if n.output)
        session = make_session(self._graph(nodes, f"suffix_{cut}", inputs, outs, constants), self.provider,
                               self.threads, optimize="extended" if risky else "all", arena=False)
        return _Suffix(session, outs, crossing, fed)

    def _outputs_from(self, suffix: _Suffix, cache: list[dict[str, np.ndarray]], weights: Weights) -> list[np.ndarray]:
        fed = {k: weights[k] for k in suffix.fed}
        parts = [dict(zip(suffix.outs, suffix.session.run(suffix.outs, {**fed, **{k: values[k] for k in suffix.crossing}})))
                 for values in cache]
        return [np.concatenate([p[t] if t in p else values[t] for p, values in zip(parts, cache)])
                for t in self.targets]

    def _prefix(self, stop: int, outs: list[str], weights: Weights, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``outs`` of the nodes before ``stop`` for one batch of samples (``values``) under ``weights``."""
        key = (stop, tuple(outs))
        if key not in self._sessions:
            nodes = self.nodes[:stop]
            used, weights_fed = self._reads(nodes)
            fed = [t for t in used if t in self.feeds]
            inputs = [_value_info(t, values[t]) for t in fed] + [self.graph_inputs[t] for t in weights_fed]
            sub = self._graph(nodes, f"nodes_before_{stop}", inputs, outs,
                              [self.initializers[t] for t in used if t in self.initializers])
            # Level "all" drops a Conv output that is also a graph output when the Conv's weight
            # is an input (onnxruntime 1.32), and cut tensors are such outputs. Several of these
            # sessions live at once: none keeps an arena at its peak.
            session = make_session(sub, self.provider, self.threads, optimize="extended", arena=False)
            self._sessions[key] = (session, fed, weights_fed)
        session, fed, weights_fed = self._sessions[key]
        return session.run(outs, {**{k: weights[k] for k in weights_fed}, **{k: values[k] for k in fed}})

    def _reads(self, nodes: list[onnx.NodeProto]) -> tuple[list[str], list[str]]:
        """The tensors ``nodes`` read, and among them the weights (graph inputs that are neither
        fed samples nor initializers)."""
        used = list(dict.fromkeys(t for n in nodes for t in n.input if t))
        return used, [t for t in used if t in self.graph_inputs and t not in self.produced and t not in self.initializers]

    def _graph(self, nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto], outs: list[str],
               constants: list[onnx.TensorProto]) -> onnx.ModelProto:
        graph = onnx.helper.make_graph(nodes, name, inputs, [onnx.helper.make_empty_tensor_value_info(t) for t in outs],
                                       constants)
        # IR 4 lets the initializers stay out of the inputs
        sub = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=max(self.model.ir_version, 4))
        sub.functions.extend(self.model.functions)
        return sub


def _value_info(name: str, value: np.ndarray) -> onnx.ValueInfoProto:
    # no shape: the last batch may be smaller, and shape tensors have no batch axis
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), None)
