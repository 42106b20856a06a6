"""The pass framework: a pass maps a model to ``PassResult(model, record)``.

A subclass implements :meth:`Pass.call`; ``__call__`` checks ``requires`` on the input, runs
``call``, checks ``ensures`` on the *result* (by default: :func:`check_structure`), and names the
failing pass when something breaks. ``Sequence`` chains passes and keeps
every record, so reports are built from records rather than by re-reading graphs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import onnx

from ..errors import OnnxccError, PassContractError


def check_structure(model: onnx.ModelProto, unique_node_names: bool = False) -> None:
    """Nodes in topological order, each tensor produced once (and, if asked, node names unique)."""
    graph = model.graph
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    names: set[str] = set()
    for node in graph.node:
        missing = next((t for t in node.input if t and t not in known), None)
        if missing is not None:
            raise PassContractError(f"node {node.name or node.op_type} reads {missing!r} before it is produced")
        for t in node.output:
            if t and t in known:
                raise PassContractError(f"tensor {t!r} is produced twice")
            known.add(t)
        if unique_node_names and (not node.name or node.name in names):
            raise PassContractError(f"node names are not unique: {node.name!r} ({node.op_type})")
        names.add(node.name)


@dataclass(frozen=True)
class PassRecord:
    """What a pass did. Subclasses add fields; ``modified`` must stay honest."""

    pass_name: str

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    @property
    def changes(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modified"] = self.modified
        return d


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    record: PassRecord


class Pass:
    """One transformation with one entry point: ``result = SomePass(...)(model)``."""

    name: str = ""

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise PassContractError if ``model`` is not a valid input for this pass."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise PassContractError if the result breaks what this pass promises: by default a
        graph in topological order with each tensor produced once, what every later pass reads."""
        check_structure(model)

    def call(self, model: onnx.ModelProto) -> PassResult:
        """Build and return a new model; never mutate ``model`` (tests check the input bytes).

        Passes work on an onnx-graphsurgeon import, which reads but never writes the proto, so
        no defensive copy of (possibly very large) weights is needed."""
        raise NotImplementedError

    def __call__(self, model_or_result: onnx.ModelProto | PassResult) -> PassResult:
        model = model_or_result.model if isinstance(model_or_result, PassResult) else model_or_result
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result

    def __repr__(self) -> str:
        return self.name or type(self).__name__


@dataclass(frozen=True)
class SequenceRecord(PassRecord):
    records: tuple[PassRecord, ...] = ()

    @property
    def changes(self) -> int:
        return sum(r.changes for r in self.records)


class Sequence(Pass):
    """Run passes in order; a failure names the pass and those that ran before it."""

    def __init__(self, *passes: Pass, name: str = "Sequence") -> None:
        self.passes = passes
        self.name = name

    def call(self, model: onnx.ModelProto) -> PassResult:
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes):
            try:
                res = p(model)
            except OnnxccError:
                raise
            except Exception as e:
                before = ", ".join(map(repr, self.passes[:i])) or "none"
                raise PassContractError(f"{p!r} failed (after: {before}): {e}") from e
            model = res.model
            records.append(res.record)
        return PassResult(model, SequenceRecord(self.name, tuple(records)))
