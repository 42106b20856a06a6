"""The op registry: one record per op, its facets registered once, and the relations between them.

Each relation below is a promise one module makes to another: the analysis lets an op through
only where the prune pass can slice its parameters, the executor can train it (or says why not),
the cost model prices it ...
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from graphs import GraphBuilder

from onnxcc.errors import UnsupportedModelError
from onnxcc.ops import OPS, OWNERS, DuplicateOpFacet, Liveness, OpRegistry, OutputKind

try:
    import torch
except ImportError:  # pragma: no cover - the CI installs it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install 'onnxcc[torch]')")


def _loaded(*facets: str) -> list:
    for facet in facets:
        OPS.load(facet)
    return list(OPS)


def _with(facet: str) -> set[str]:
    return {s.name for s in OPS if getattr(s, facet)}


# ---- the registry itself --------------------------------------------------------------------------
def test_a_facet_set_twice_is_refused():
    reg = OpRegistry()
    reg.declare("Relu", "Sigmoid", family="unary")
    with pytest.raises(DuplicateOpFacet, match="Sigmoid: family is registered twice"):
        reg.declare("Tanh", "Sigmoid", family="unary")
    assert reg.get("Tanh").family is None   # a refused declaration sets nothing

    @reg.prune("Conv")
    def one(ctx, node):
        pass

    with pytest.raises(DuplicateOpFacet, match="Conv: prune"):
        reg.prune("Conv")(one)
    with pytest.raises(TypeError, match="unknown op facet"):
        reg.declare("Conv", colour="red")
    reg.declare("Conv", domain="com.example", layer=True)   # another domain is another op
    assert reg.get("Conv", "com.example").layer and not reg.get("Conv").layer


def test_the_live_registry_refuses_a_second_owner():
    _loaded("channel_rule")
    with pytest.raises(DuplicateOpFacet, match="Relu: channel_rule"):
        OPS.channel_rule("Relu")(lambda ctx, node: None)
    with pytest.raises(DuplicateOpFacet, match="Conv: layer"):
        OPS.declare("Conv", layer=True)


def test_lookup_by_node_and_domain():
    proto = helper.make_node("Conv", ["x", "w"], ["y"])
    node = gs.Node("Conv", inputs=[], outputs=[])
    assert OPS.of(proto) is OPS.of(node) is OPS.get("Conv", "ai.onnx") is OPS.get("Conv", None)
    custom = helper.make_node("Conv", ["x", "w"], ["y"], domain="com.microsoft")
    spec = OPS.of(custom)
    assert spec.name == "com.microsoft:Conv" and not spec.layer and spec.channel_rule is None
    assert OPS.get("NoSuchOp").name == "NoSuchOp" and "NoSuchOp" not in {s.op for s in OPS}


@needs_torch
def test_each_behaviour_is_registered_by_its_owner():
    for spec in _loaded(*OWNERS):
        for facet, owner in OWNERS.items():
            fn = getattr(spec, facet)
            assert fn is None or fn.__module__ == owner, (spec.name, facet, fn.__module__)


# ---- relations between facets ---------------------------------------------------------------------
def test_ops_whose_parameters_follow_the_channels_have_a_rule_and_a_prune_handler():
    _loaded("channel_rule", "prune")
    params = _with("channel_params")
    assert params, "no channel rule registered"
    assert params <= _with("channel_rule")
    assert params == _with("prune"), "a handler without channel parameters would never slice anything"


@needs_torch
def test_every_op_the_analysis_lets_through_runs_in_the_executor_or_says_why_not():
    """compress --finetune trains what compress accepted: an op with a channel rule that the
    executor lacks would fail only after minutes of compression."""
    _loaded("channel_rule", "executor")
    ruled, runs, why_not = _with("channel_rule"), _with("executor"), _with("not_trainable")
    assert ruled - runs <= why_not, sorted(ruled - runs - why_not)
    assert not runs & why_not, "an op the executor runs is listed as not trainable"
    assert not (_with("weights") - runs), "learned weights of an op the executor cannot run"


def test_layers_have_costs_rules_and_weights():
    _loaded("channel_rule", "cost")
    layers = _with("layer")
    assert layers == {"Conv", "ConvTranspose", "Gemm", "MatMul"}
    assert layers == _with("cost"), "MACs are counted on the weight layers alone"
    assert layers <= _with("channel_params") and layers <= _with("weights")
    assert {s.name for s in OPS if s.fold_axis is not None} <= layers


def test_affine_maps_fold_per_channel_constants():
    _loaded("channel_rule", "affine")
    assert _with("affine") == {"BatchNormalization", "Mul", "Div", "Add", "Sub"}
    assert _with("affine") <= _with("channel_params")


def test_liveness_kinds_have_channel_rules():
    _loaded("channel_rule")
    uniform = {s.name for s in OPS if s.liveness is not None}
    joins = {s.name for s in OPS if s.liveness is Liveness.JOIN}
    assert joins and joins < uniform <= _with("channel_rule")
    assert joins <= set(OPS.family("elementwise")), "a join broadcasts one operand onto another"


@needs_torch
def test_output_kinds_are_consistent():
    _loaded("channel_rule", "executor")
    kinds = {k: {s.name for s in OPS if s.output is k} for k in OutputKind}
    assert all(kinds.values())
    assert set().union(*kinds.values()) <= _with("channel_rule") & _with("executor")
    assert kinds[OutputKind.PASSES].isdisjoint(_with("layer")), "a layer's output is judged as it is"
    assert kinds[OutputKind.CLASSIFIES] <= {"Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin"}


def test_families_identity_and_quantized_ops():
    _loaded("channel_rule")
    for family in ("unary", "pool", "elementwise", "reduce"):
        assert set(OPS.family(family)) <= _with("channel_rule"), family
    assert _with("identity") <= set(OPS.family("unary"))
    quantized = _with("quantized")
    assert quantized and not quantized & _with("channel_rule")
    assert quantized <= _with("not_trainable")
    assert _with("per_channel_weights") <= _with("weights")


# ---- the early check of fine-tuning ----------------------------------------------------------------
def _with_acos(constant_only: bool):
    """A small CNN with an Acos (the executor has none) on its activations, or on a constant."""
    g = GraphBuilder(13, 0, "acos")
    y = g.conv(g.input((1, 3, 8, 8)), 4, 3)
    if constant_only:
        y = g.add(y, g.node("Acos", [g.init(np.full((1, 4, 1, 1), 0.5, np.float32))], (1, 4, 1, 1)))
    else:
        y = g.node("Acos", [y], g.shapes[y])
    return g.build(y)


@needs_torch
def test_check_trainable_names_the_op_in_one_line():
    from onnxcc.finetuning import check_trainable

    model = _with_acos(constant_only=False)
    with pytest.raises(UnsupportedModelError, match="fine-tuning does not support ONNX op\\(s\\) Acos") as e:
        check_trainable(model, before_compression=True)
    assert "\n" not in str(e.value)
    folded = _with_acos(constant_only=True)
    check_trainable(folded, before_compression=True)   # compression folds the constant Acos away
    with pytest.raises(UnsupportedModelError, match="Acos"):
        check_trainable(folded)
    model.graph.node[-1].op_type = "QLinearConv"
    with pytest.raises(UnsupportedModelError, match="QLinearConv \\(integer quantized op"):
        check_trainable(model)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxcc", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@needs_torch
@pytest.mark.parametrize("command", ["finetune", "compress"])
def test_finetune_refuses_an_unsupported_op_before_any_work(tmp_path, command):
    """Before the data is read (it does not exist here) or compression starts: exit 2, one line."""
    model = tmp_path / "m.onnx"
    onnx.save(_with_acos(constant_only=False), model)
    missing = tmp_path / "no-such-data"
    args = (["finetune", model, "--teacher", model, "--data", missing] if command == "finetune"
            else ["compress", model, "--flops", "0.3", "--finetune", missing])
    r = _cli(*args, "-o", tmp_path / "out.onnx")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "onnxcc: error: fine-tuning does not support ONNX op(s) Acos"
    assert not (tmp_path / "out.onnx").exists()
