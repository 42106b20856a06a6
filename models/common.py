"""Helpers shared by the corpus builders (seeding, BN randomisation, ONNX export/verification)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["randomize_bn", "seeded", "export", "check_onnx", "ort_run"]


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats, so BN folding matters."""
    g = torch.Generator().manual_seed(seed + 1000)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.5)  # U(0.5, 1.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)  # U(0.5, 2.0)
    return model


def export(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int],
    opset: int,
    input_name: str = "input",
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = False,
    keep_bn: bool = True,
) -> None:
    """Export with the legacy TorchScript exporter (``dynamo=False``), constant folding on.

    ``keep_bn=True`` exports with ``TrainingMode.PRESERVE`` (model in eval mode), which keeps
    ``BatchNormalization`` nodes (inference form) instead of letting the exporter fuse them
    into the preceding Conv; ``keep_bn=False`` is the plain eval export (BN fused away).
    """
    import warnings

    model = model.eval()
    dummy = torch.zeros(*input_shape)
    dyn = None
    if dynamic_batch:
        dyn = {input_name: {0: "N"}}
        for o in output_names:
            dyn[o] = {0: "N"}
    training = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            os.fspath(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
            training=training,
            dynamo=False,
        )


def ort_run(model_or_path, x: np.ndarray) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort

    if isinstance(model_or_path, onnx.ModelProto):
        data = model_or_path.SerializeToString()
    else:
        data = os.fspath(model_or_path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x})


def check_onnx(model_or_path, torch_model: nn.Module | None, x: np.ndarray, tol: float = 1e-4) -> float:
    """onnx full check + onnxruntime run; compare with ``torch_model(x)`` (if given).

    Returns the max abs difference scaled by ``max(1, max|y_torch|)``; raises if above ``tol``.
    """
    import onnx

    m = onnx.load(os.fspath(model_or_path)) if not isinstance(model_or_path, onnx.ModelProto) else model_or_path
    onnx.checker.check_model(m, full_check=True)
    outs = ort_run(m, x)
    if torch_model is None:
        return 0.0
    with torch.no_grad():
        ref = torch_model.eval()(torch.from_numpy(x))
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    worst = 0.0
    for r, o in zip(refs, outs):
        r = r.numpy()
        if r.shape != o.shape:
            raise AssertionError(f"shape mismatch torch {r.shape} vs ort {o.shape}")
        err = float(np.max(np.abs(r - o))) / max(1.0, float(np.max(np.abs(r))))
        worst = max(worst, err)
    if not worst <= tol:
        raise AssertionError(f"torch vs onnxruntime mismatch: {worst:.3g} > {tol}")
    return worst


_FOLDABLE = {
    "Cast", "Concat", "ConstantOfShape", "Div", "Gather", "Mul", "Add", "Sub", "Range",
    "Reshape", "Slice", "Squeeze", "Unsqueeze", "Transpose", "Neg", "Equal", "Where", "Expand", "Identity",
}


def fold_small_constants(model, max_elems: int = 4096):
    """Evaluate shape-helper subgraphs whose inputs are all constant (e.g. the chain the
    legacy exporter emits for ``F.pad`` at opset >= 11) and store the results as initializers.

    Only ops in a small whitelist with outputs of at most ``max_elems`` elements are folded,
    so weights are never touched.  Returns a new model.
    """
    import copy

    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    m = copy.deepcopy(model)
    g = m.graph
    const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    graph_outputs = {o.name for o in g.output}
    opset = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    new_nodes, folded = [], {}
    for n in g.node:
        ok = (
            n.op_type in _FOLDABLE
            and n.domain in ("", "ai.onnx")
            and all((i == "" or i in const) for i in n.input)
            and not (set(n.output) & graph_outputs)
        )
        if ok:
            inputs = [i for i in n.input if i]
            sub = onnx.helper.make_graph(
                [n], "fold",
                [onnx.helper.make_tensor_value_info(i, onnx.helper.np_dtype_to_tensor_dtype(const[i].dtype), const[i].shape) for i in inputs],
                [onnx.helper.make_empty_tensor_value_info(o) for o in n.output],
            )
            try:
                res = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=opset)).run(None, {i: const[i] for i in inputs})
            except Exception:
                res = None
            if res is not None and all(np.asarray(r).size <= max_elems for r in res):
                for o, r in zip(n.output, res):
                    const[o] = np.asarray(r)
                    folded[o] = np.asarray(r)
                continue
        new_nodes.append(n)
    if not folded:
        return m
    used = {i for n in new_nodes for i in n.input} | graph_outputs
    for n in new_nodes:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= {i for sn in sub.node for i in sn.input}
    del g.node[:]
    g.node.extend(new_nodes)
    for name, arr in folded.items():
        if name in used:
            g.initializer.append(numpy_helper.from_array(arr, name))
    # drop Constant nodes / initializers that nothing uses any more
    keep = [n for n in g.node if not (n.op_type == "Constant" and not (set(n.output) & used))]
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    vi = [v for v in g.value_info if v.name not in folded]
    del g.value_info[:]
    g.value_info.extend(vi)
    return m
