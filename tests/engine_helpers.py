"""Shared test helpers that drive onnxcc's engine (the oracles in oracles.py stay independent)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcc.analysis.groups import Analysis, analyse
from onnxcc.analysis.view import build_view, resolve_input_shapes
from onnxcc.passes.normalize import normalize


def normalized_analysis(model: onnx.ModelProto, feeds=None) -> tuple[onnx.ModelProto, Analysis]:
    norm = normalize(model).model
    return norm, analyse(build_view(norm, resolve_input_shapes(norm), feeds))


def random_keep(analysis: Analysis, seed: int = 0, frac: float = 0.5) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep = {}
    for gid, g in analysis.groups.items():
        if g.prunable:
            m = rng.random(g.size) < frac
            m[rng.integers(g.size)] = True
            keep[gid] = m
    return keep


def zero_reads(analysis: Analysis, model: onnx.ModelProto, keep: dict[int, np.ndarray]) -> onnx.ModelProto:
    """Zero every weight that *reads* a channel marked for removal.

    Removing such channels must then leave the outputs unchanged, whatever the channels carried:
    this is the exactness oracle for pruning (it does not depend on activations mapping 0 to 0).
    """
    g = gs.import_onnx(model)
    for n in g.nodes:
        layer = next((l for l in analysis.layers if l.key == n.outputs[0].name), None)
        if layer is None or layer.red_layout is None:
            continue
        m = analysis.mask(n.inputs[0].name, keep)
        if m is None or m.all():
            continue
        W = np.array(n.inputs[1].values)
        if n.op == "Conv" or (n.op == "Gemm" and n.attrs.get("transB", 0)):
            W[:, ~m] = 0
        else:  # ConvTranspose (Cin first), Gemm without transB and MatMul (K first)
            W[~m] = 0
        n.inputs[1] = gs.Constant(n.inputs[1].name + "_zeroed", W)
    return gs.export_onnx(g)
