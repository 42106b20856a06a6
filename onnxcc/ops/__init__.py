"""The op registry: per ONNX op, its channel rule, prune handler, cost, liveness, normalization,
executor function and output kind, in one record (:class:`OpSpec`) under :data:`OPS`.

Importing this package loads the declared facts (:mod:`.catalog`) and nothing above the
standard library; behaviour arrives as its owning modules are imported, or on demand
(:meth:`OpRegistry.load`).
"""
from __future__ import annotations

from .catalog import declare_facts
from .registry import FACETS, OPS, OWNERS, DuplicateOpFacet, Liveness, OpRegistry, OpSpec, OutputKind, domain_of

declare_facts(OPS)

__all__ = ["FACETS", "OPS", "OWNERS", "DuplicateOpFacet", "Liveness", "OpRegistry", "OpSpec", "OutputKind",
           "domain_of"]
