"""One record per ONNX op: everything onnxcc knows about it, whichever module acts on it.

Behaviour (how channels flow, how a node is pruned, costed, folded, executed in torch) is
registered by the module that owns it, with a decorator on :data:`OPS`; plain facts (an op is a
layer, keeps positions independent, is quantized, ...) are declared in :mod:`.catalog`. A facet
set twice for one op is refused, so two modules can never disagree silently about an op.

This module imports only the standard library: every layer of onnxcc may import it. Owners of
behaviour are imported by name only when a question needs their facet (:meth:`OpRegistry.load`),
so that asking whether the torch executor runs an op never imports torch before it is needed.
"""
from __future__ import annotations

import enum
import importlib
from dataclasses import dataclass, fields
from functools import partialmethod
from typing import Any, Callable, Iterable, Iterator

DEFAULT_DOMAINS = ("", "ai.onnx")


class Liveness(enum.Enum):
    """How an op treats a constant map reaching it, when an emptied channel group folds away."""

    UNIFORM = "uniform"   # each position depends on that position alone: a [1, C, 1, 1] stands for the map
    JOIN = "join"         # uniform, and a broadcasting join with a live tensor, where the constant may end


class OutputKind(enum.Enum):
    """What an op at the end of a graph output says about how that output is judged."""

    PASSES = "passes"           # reshapes or renames: look through it
    SQUASHES = "squashes"       # saturating scores (Sigmoid): judge its input
    CLASSIFIES = "classifies"   # class scores or indices (Softmax, ArgMax): judge its input, compare top-1


@dataclass
class OpSpec:
    """Everything known about one op. Behaviour facets are None until their owner registers them."""

    domain: str
    op: str
    # -- behaviour, registered by the owning module (see OWNERS)
    channel_rule: Callable | None = None   # analysis.op_rules: layouts of the outputs from the inputs'
    prune: Callable | None = None          # passes.prune: slices parameters to the kept channels
    cost: Callable | None = None           # analysis.costs: MACs from input, weight and output shapes
    affine: Callable | None = None         # passes.normalize: the per-channel scale and shift it applies
    executor: Callable | None = None       # finetuning.executor: the torch function that runs it
    # -- facts, declared in .catalog (channel_params with the channel rule)
    channel_params: bool = False           # parameters depend on the channel count: needs a prune handler
    family: str | None = None              # ops one rule treats alike: unary, pool, elementwise, reduce
    layer: bool = False                    # a weight layer: counted in MACs, pruned and factorized
    fold_axis: int | None = None           # weight axis of the output channels a following affine map folds into
    liveness: Liveness | None = None
    output: OutputKind | None = None
    identity: bool = False                 # its first output is its first input at inference
    quantized: bool = False                # an integer op: the model is already quantized
    weights: tuple[int, ...] = ()          # input positions holding learned weights (trained when fine-tuning)
    per_channel_weights: bool = False      # ... only when they are per-channel vectors (a scale, a shift)
    not_trainable: str | None = None       # why the torch executor deliberately lacks it
    reads_shape: bool = False              # reads its inputs' shapes, never their values

    @property
    def name(self) -> str:
        """The op as messages show it: ``Conv``, or ``com.microsoft:FusedConv`` outside the default domain."""
        return f"{self.domain}:{self.op}" if self.domain else self.op


FACETS = tuple(f.name for f in fields(OpSpec) if f.name not in ("domain", "op"))
_DEFAULTS = {f.name: f.default for f in fields(OpSpec)}

# Where each behaviour facet is registered: imported on demand so a question about a facet is
# answered with its owner loaded (by name: the owners sit above this module).
OWNERS = {
    "channel_rule": "onnxcc.analysis.op_rules",
    "prune": "onnxcc.passes.prune",
    "cost": "onnxcc.analysis.costs",
    "affine": "onnxcc.passes.normalize",
    "executor": "onnxcc.finetuning.executor",
}


class DuplicateOpFacet(ValueError):
    """A facet of an op was set twice: two modules claim the same knowledge."""


def domain_of(domain: str | None) -> str:
    return "" if domain in (None, *DEFAULT_DOMAINS) else domain


class OpRegistry:
    """The records of all ops, keyed by (domain, op type); the default domain is ``""``."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], OpSpec] = {}

    # -- filling it ------------------------------------------------------------------------
    def _spec(self, op: str, domain: str | None) -> OpSpec:
        key = (domain_of(domain), op)
        if key not in self._specs:
            self._specs[key] = OpSpec(*key)
        return self._specs[key]

    def declare(self, *ops: str, domain: str = "", **facets: Any) -> None:
        """Set facets of ``ops``; a facet already set (to anything but its default) is refused."""
        unknown = set(facets) - set(FACETS)
        if unknown:
            raise TypeError(f"unknown op facet(s) {sorted(unknown)}")
        specs = [self._spec(op, domain) for op in ops]
        for spec in specs:   # all checked first: a refused declaration leaves no op half-declared
            for facet in facets:
                if getattr(spec, facet) != _DEFAULTS[facet]:
                    raise DuplicateOpFacet(f"{spec.name}: {facet} is registered twice")
        for spec in specs:
            for facet, value in facets.items():
                setattr(spec, facet, value)

    def register(self, facet: str, *ops: str, domain: str = "", **more: Any) -> Callable[[Callable], Callable]:
        """A decorator setting ``facet`` of ``ops`` to the decorated function (and ``more`` facts)."""
        def deco(fn: Callable) -> Callable:
            self.declare(*ops, domain=domain, **{facet: fn}, **more)
            return fn
        return deco

    def channel_rule(self, *ops: str, params: bool = False) -> Callable[[Callable], Callable]:
        """``params``: the op's parameters depend on the channel count (it needs a prune handler)."""
        return self.register("channel_rule", *ops, **({"channel_params": True} if params else {}))

    # @OPS.prune("Conv") and alike: register(facet, *ops) for the other behaviours
    prune = partialmethod(register, "prune")
    cost = partialmethod(register, "cost")
    affine = partialmethod(register, "affine")
    executor = partialmethod(register, "executor")

    # -- asking it -------------------------------------------------------------------------
    def get(self, op: str, domain: str | None = "") -> OpSpec:
        """The op's record; an empty one (every facet unset) for an op nobody registered."""
        return self._specs.get((domain_of(domain), op)) or OpSpec(domain_of(domain), op)

    def of(self, node: Any) -> OpSpec:
        """The record of a node: an ``onnx.NodeProto`` or an onnx-graphsurgeon node."""
        op = node.op_type if hasattr(node, "op_type") else node.op
        return self.get(op, getattr(node, "domain", ""))

    def __iter__(self) -> Iterator[OpSpec]:
        return iter(list(self._specs.values()))

    def family(self, name: str) -> tuple[str, ...]:
        return tuple(s.op for s in self if s.family == name)

    def load(self, facet: str) -> None:
        """Import the module that registers ``facet`` (the executor's imports torch)."""
        if facet in OWNERS:
            importlib.import_module(OWNERS[facet])

    def missing(self, facet: str, nodes: Iterable[Any]) -> list[OpSpec]:
        """The ops of ``nodes`` (one record each, sorted by name) without ``facet``, its owner loaded."""
        self.load(facet)
        found = {(s.domain, s.op): s for s in map(self.of, nodes) if getattr(s, facet) == _DEFAULTS[facet]}
        return sorted(found.values(), key=lambda s: s.name)


OPS = OpRegistry()
