"""The checks every emitted model passes, as a pass: it changes nothing and records what it found.

:class:`CheckPass` ends compress's rewrite and runs again on the recovered model: the full ONNX
checker, an onnxruntime run at the calibration shapes, the MACs at those runtime shapes equal to
what the plan priced, no more parameters than the original (a shared weight copied per reader is
never what compression means). Its ``ensures`` holds what the later stages rely on: nodes in
topological order, each tensor produced once and every node named, uniquely
(:class:`~.normalize.NameNodesPass` names them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from ..analysis.costs import model_params, node_macs
from ..analysis.view import build_view
from ..errors import PassContractError, VerificationError
from .base import Pass, PassRecord, PassResult, check_structure


@dataclass(frozen=True)
class CheckRecord(PassRecord):
    macs: int = 0       # at the runtime shapes onnxruntime gives
    params: int = 0
    nodes: int = 0
    planned_macs: int | None = None    # what the MACs had to equal
    max_params: int | None = None      # what the parameters could not exceed


class CheckPass(Pass):
    """``CheckPass(shapes, feeds, macs=planned, max_params=original)(model)``: ``model`` unchanged,
    or :class:`VerificationError` naming what a user would have met."""

    name = "check"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], feeds: Mapping[str, np.ndarray],
                 macs: int | None = None, max_params: int | None = None) -> None:
        self.shapes, self.feeds, self.macs, self.max_params = dict(shapes), feeds, macs, max_params

    def call(self, model: onnx.ModelProto) -> PassResult:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001 - the checker raises several types
            raise VerificationError(f"compressed model fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
        try:
            view = build_view(model, self.shapes, self.feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise VerificationError(f"compressed model does not run: {e}") from None
        macs, params = int(sum(node_macs(view, n) for n in view.nodes)), model_params(model)
        if self.macs is not None and macs != self.macs:
            raise PassContractError(f"the model computes {macs:,} MACs at runtime shapes; the plan priced {self.macs:,}")
        if self.max_params is not None and params > self.max_params:
            raise VerificationError(f"compressed model has more parameters than the original "
                                    f"({self.max_params} -> {params})")
        return PassResult(model, CheckRecord(self.name, macs=macs, params=params, nodes=len(model.graph.node),
                                             planned_macs=self.macs, max_params=self.max_params))

    def ensures(self, model: onnx.ModelProto) -> None:
        check_structure(model, unique_node_names=True)
