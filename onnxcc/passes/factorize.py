"""Low-rank factorization of Conv layers into cheaper chains of Convs.

**SVD** (``method="svd"``). With ``Wm = reshape(W, Cout × Cin·k·k) = U S Vᵀ`` and rank ``r``:
``A = √S_r V_rᵀ`` reshaped to ``r × Cin × k × k`` keeps the original stride, padding and
dilation; ``B = U_r √S_r`` is a ``1×1`` conv ``r → Cout`` that takes the original bias. At
``r = min(Cout, Cin·k·k)`` the product ``B·A`` equals ``W`` to float rounding.

**Tucker-2** (``method="tucker2"``, via tensorly). ``W ≈ G ×₀ U_out ×₁ U_in`` with core ``G`` of
shape ``r_out × r_in × k × k`` becomes ``1×1 (Cin → r_in)`` · ``k×k (r_in → r_out)`` ·
``1×1 (r_out → Cout)``; exact when ``r_in = Cin`` and ``r_out = Cout``.

Optionally the SVD is *whitened* by the layer-input covariance (``whiten[key] = Sx^{1/2}``,
a ``Cin·k·k`` square factor): minimising ``‖(W − W_r) X‖`` instead of ``‖W − W_r‖`` keeps the
directions the data actually uses (activation-aware SVD).

The output tensor keeps its name (it is now produced by the last factor), so every consumer
and the channel analysis see the same graph interface.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PassContractError
from ..graph import Namer, constant, export_model, import_graph
from .base import Pass, PassRecord, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FactorizeRecord(PassRecord):
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # output name -> ranks
    skipped: dict[str, str] = field(default_factory=dict)
    method: str = "svd"

    @property
    def changes(self) -> int:
        return len(self.layers)


def svd_factors(W: np.ndarray, rank: int, whiten: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with ``B @ A ≈ reshape(W)``: A is ``r × Cin × k × k``, B is ``Cout × r × 1 × 1``.

    Whitened: with ``Wm·L = U S Vᵀ`` (``L Lᵀ = Sx``) the best rank-r fit in the data's metric is
    ``U_r U_rᵀ Wm``, so ``B = U_r`` and ``A = U_rᵀ Wm`` — no inverse of ``L`` needed.
    """
    cout = W.shape[0]
    Wm = W.reshape(cout, -1).astype(np.float64)
    if whiten is None:
        U, S, Vt = np.linalg.svd(Wm, full_matrices=False)
        root = np.sqrt(S[:rank])
        A, B = root[:, None] * Vt[:rank], U[:, :rank] * root
    else:
        U, _, _ = np.linalg.svd(Wm @ whiten, full_matrices=False)
        B = U[:, :rank]
        A = B.T @ Wm
    return (A.reshape((rank,) + W.shape[1:]).astype(W.dtype),
            B.reshape(cout, rank, *([1] * (W.ndim - 2))).astype(W.dtype))


def tucker2_factors(W: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first 1×1, k×k core, last 1×1) conv weights of a Tucker-2 decomposition."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    tl.set_backend("numpy")
    (core, (u_out, u_in)), _ = partial_tucker(W.astype(np.float64), rank=[r_out, r_in], modes=[0, 1],
                                             init="svd", n_iter_max=0 if (r_out, r_in) == W.shape[:2] else 20)
    nd = W.ndim - 2
    first = u_in.T.reshape(u_in.shape[1], W.shape[1], *([1] * nd))
    last = u_out.reshape(W.shape[0], u_out.shape[1], *([1] * nd))
    return first.astype(W.dtype), core.astype(W.dtype), last.astype(W.dtype)


class FactorizeConvPass(Pass):
    """Replaces each named Conv with its low-rank chain (SVD: 2 convs; Tucker-2: 3 convs).

    Args:
        ranks: output tensor name of a Conv → rank (SVD) or (r_out, r_in) (Tucker-2).
        method: "svd" or "tucker2".
        whiten: optional per-layer ``Cin·k·k`` square factor of the input covariance (SVD only).
    """

    name = "FactorizeConv"

    def __init__(self, ranks: dict[str, int | tuple[int, int]], method: str = "svd",
                 whiten: dict[str, np.ndarray] | None = None) -> None:
        if method not in ("svd", "tucker2"):
            raise PassContractError(f"unknown factorization method {method!r}")
        self.ranks, self.method, self.whiten = dict(ranks), method, dict(whiten or {})

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        namer = Namer(graph)
        convs = {n.outputs[0].name: n for n in graph.nodes if n.op == "Conv"}
        done, skipped = {}, {}
        for key, rank in self.ranks.items():
            node = convs.get(key)
            why = self._check(node)
            if why:
                skipped[key] = why
                log.debug("FactorizeConv: skipped %s: %s", key, why)
                continue
            done[key] = self._rewrite(graph, node, rank, namer)
        out = export_model(graph, model, clear_shapes=True) if done else model
        return PassResult(out, FactorizeRecord(self.name, done, skipped, self.method))

    @staticmethod
    def _check(node: gs.Node | None) -> str:
        if node is None:
            return "no Conv produces this tensor"
        if node.attrs.get("group", 1) != 1:
            return "grouped or depthwise conv"
        if not isinstance(node.inputs[1], gs.Constant):
            return "weights are not constant"
        if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
            return "bias is not constant"
        return ""

    def _rewrite(self, graph: gs.Graph, node: gs.Node, rank, namer: Namer) -> tuple[int, ...]:
        W = np.asarray(node.inputs[1].values)
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        nd = W.ndim - 2
        base = node.name or node.outputs[0].name
        if self.method == "svd":
            r = int(min(rank, W.shape[0], int(np.prod(W.shape[1:]))))
            weights = svd_factors(W, r, self.whiten.get(node.outputs[0].name))
            ranks: tuple[int, ...] = (r,)
            spatial_at = 0
        else:
            r_out, r_in = (rank, rank) if np.isscalar(rank) else rank
            kk = int(np.prod(W.shape[2:]))
            # A Tucker factor cannot exceed the rank of its unfolding.
            r_out = int(min(r_out, W.shape[0], W.shape[1] * kk))
            r_in = int(min(r_in, W.shape[1], W.shape[0] * kk))
            weights = tucker2_factors(W, r_out, r_in)
            ranks = (r_out, r_in)
            spatial_at = 1
        pointwise = {"kernel_shape": [1] * nd, "strides": [1] * nd, "pads": [0] * (2 * nd),
                     "dilations": [1] * nd}
        x, y = node.inputs[0], node.outputs[0]
        chain = []
        for i, w in enumerate(weights):
            last = i == len(weights) - 1
            attrs = dict(node.attrs) if i == spatial_at else dict(pointwise)
            attrs["group"] = 1
            attrs["kernel_shape"] = list(w.shape[2:])
            inputs = [x, constant(namer, f"{base}_f{i}_w", w)] + ([bias] if last and bias is not None else [])
            out = y if last else gs.Variable(namer(f"{base}_f{i}"), dtype=W.dtype)
            chain.append(gs.Node("Conv", namer(f"{base}_f{i}"), attrs, inputs, [out]))
            x = out
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend(chain)
        return ranks
