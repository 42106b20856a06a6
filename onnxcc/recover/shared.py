"""Tensors without a sample axis: what a graph computes from its inputs' shapes alone.

Exports with dynamic sizes compute reshape targets, scalars and anchor grids at run time from
``Shape`` (YOLOv8's head builds its anchors from the feature maps' sizes, and they stay alive
across most of the head). Such a tensor is the same for every sample and has no sample axis:
recovery, which runs the graph in batches and cuts it into segments and blocks, can neither
concatenate it over batches nor index it by sample. It is computed instead for the size of the
batch at hand (a reshape target such as ``[N, C, -1]`` depends on that size), once per size.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx

from ..ops import OPS
from ..runtime import expose_outputs, make_session


def sample_free(model: onnx.ModelProto) -> set[str]:
    """Node outputs of ``model`` that no sample's values reach: made from constants and from the
    shapes of other tensors only. A node with a subgraph may read samples its inputs do not list,
    so its outputs count as carrying them."""
    g = model.graph
    consts = {i.name for i in g.initializer}
    carrying = {i.name for i in g.input if i.name not in consts}
    free: set[str] = set()
    for n in g.node:
        if n.op_type == "Constant":
            continue
        reads = set() if OPS.of(n).reads_shape else {i for i in n.input if i}
        nested = any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)
        (carrying if nested or reads & carrying else free).update(o for o in n.output if o)
    return free


class SharedValues:
    """The sample-free tensors ``names`` of ``model`` for a batch of any size: computed from
    ``like`` (one sample per graph input, repeated to the size), once per size."""

    def __init__(self, model: onnx.ModelProto, names: set[str], like: Mapping[str, np.ndarray],
                 provider: str = "cpu"):
        self.names = sorted(names)
        self._names = frozenset(names)
        self.model, self.provider = model, provider
        self.like = {k: np.asarray(v[:1]) for k, v in like.items()}
        self._session = None
        self._by_size: dict[int, dict[str, np.ndarray]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def __call__(self, size: int) -> dict[str, np.ndarray]:
        if not self.names:
            return {}
        if size not in self._by_size:
            if self._session is None:
                self._session = make_session(expose_outputs(self.model, self.names), self.provider)
            feeds = {k: np.repeat(v, size, axis=0) for k, v in self.like.items()}
            self._by_size[size] = dict(zip(self.names, self._session.run(self.names, feeds)))
        return self._by_size[size]
