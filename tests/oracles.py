"""Independent reference helpers for onnxcc tests.

Nothing in here imports ``onnxcc``: these are the oracles the compressor is
judged against (onnxruntime execution, output comparison, MAC counting from
the shapes onnxruntime really produces, the full ONNX checker).
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

ModelLike = Union[onnx.ModelProto, bytes, str, os.PathLike]

__all__ = [
    "ort_session",
    "run",
    "run_named",
    "random_feeds",
    "assert_same_outputs",
    "runtime_macs",
    "runtime_macs_by_node",
    "check_model_full",
]


# --------------------------------------------------------------------------
# onnxruntime
# --------------------------------------------------------------------------

def _session_options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def _as_bytes(model: ModelLike) -> Union[bytes, str]:
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return os.fspath(model)


def ort_session(model_or_bytes: ModelLike) -> ort.InferenceSession:
    """CPU-only session with every graph optimisation disabled and one thread."""
    return ort.InferenceSession(
        _as_bytes(model_or_bytes),
        sess_options=_session_options(),
        providers=["CPUExecutionProvider"],
    )


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    return onnx.load(os.fspath(model))


def _filter_feeds(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict:
    names = {i.name for i in sess.get_inputs()}
    missing = names - set(feeds)
    if missing:
        raise KeyError(f"feeds are missing graph inputs {sorted(missing)}")
    return {k: v for k, v in feeds.items() if k in names}


def run(model: ModelLike, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime; returns outputs in graph-output order.

    Extra entries in ``feeds`` that are not graph inputs are ignored.
    """
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    return sess.run(None, _filter_feeds(sess, feeds))


def run_named(model: ModelLike, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Like :func:`run` but returns ``{output_name: array}``."""
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, _filter_feeds(sess, feeds))))


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def random_feeds(model: ModelLike, seed: int = 0, batch: int = 1) -> dict[str, np.ndarray]:
    """Random feeds for every (non-initializer) graph input.

    Concrete dims are taken from the graph input; dynamic dims become 1,
    except a dynamic leading (batch) dim, which becomes ``batch``.
    """
    m = _load(model)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for vi in _real_inputs(m):
        tt = vi.type.tensor_type
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(batch if i == 0 else 1)
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.integers(0, 2, size=dims).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, 10, size=dims).astype(dtype)
        else:  # pragma: no cover - exotic types
            raise TypeError(f"random_feeds: unsupported input type {dtype} for {vi.name!r}")
        feeds[vi.name] = arr
    return feeds


# --------------------------------------------------------------------------
# output comparison
# --------------------------------------------------------------------------

def _diff_report(name: str, x: np.ndarray, y: np.ndarray, rtol: float, atol: float) -> tuple[bool, str]:
    """Return (ok, line) for one output pair of equal shape."""
    if x.dtype.kind not in "fc" or y.dtype.kind not in "fc":
        ok = bool(np.array_equal(x, y))
        n = int(np.sum(x != y)) if x.shape == y.shape else -1
        return ok, f"  {name}: non-float dtype {x.dtype}/{y.dtype}, {n} mismatching elements"
    xf = x.astype(np.float64)
    yf = y.astype(np.float64)
    nan_x, nan_y = np.isnan(xf), np.isnan(yf)
    if nan_x.any() or nan_y.any():
        if not np.array_equal(nan_x, nan_y):
            return False, (f"  {name}: NaN pattern differs "
                           f"(a has {int(nan_x.sum())} NaNs, b has {int(nan_y.sum())})")
        keep = ~nan_x
        xf, yf = xf[keep], yf[keep]
    if xf.size == 0:
        return True, f"  {name}: empty"
    inf_x, inf_y = np.isinf(xf), np.isinf(yf)
    if inf_x.any() or inf_y.any():
        if not (np.array_equal(inf_x, inf_y) and np.array_equal(xf[inf_x], yf[inf_y])):
            return False, f"  {name}: Inf pattern differs"
        keep = ~inf_x
        xf, yf = xf[keep], yf[keep]
        if xf.size == 0:
            return True, f"  {name}: all inf, equal"
    absdiff = np.abs(xf - yf)
    max_abs = float(absdiff.max())
    scale = float(np.abs(xf).max())
    tol = atol + rtol * scale
    rel = absdiff / np.maximum(np.abs(xf), 1e-30)
    worst = int(absdiff.argmax())
    ok = max_abs <= tol
    line = (f"  {name}: shape={tuple(x.shape)} max_abs_diff={max_abs:.3e} "
            f"max_rel_diff={float(rel.max()):.3e} allowed={tol:.3e} "
            f"(atol={atol:g} + rtol={rtol:g} * max|a|={scale:.3e}); "
            f"worst at flat index {worst}: a={xf.flat[worst]:.6g} b={yf.flat[worst]:.6g}"
            f"{'' if ok else '  <-- FAIL'}")
    return ok, line


def assert_same_outputs(a: ModelLike, b: ModelLike, feeds: Mapping[str, np.ndarray] | None = None,
                        rtol: float = 1e-5, atol: float = 1e-6) -> dict[str, float]:
    """Run both models in onnxruntime and compare every output by name.

    Output name sets and shapes must match exactly. Values use a scale-aware
    criterion per output: ``max|a-b| <= atol + rtol * max|a|``.
    Returns ``{output_name: max_abs_diff}`` on success.
    """
    if feeds is None:
        feeds = random_feeds(a)
    sa = a if isinstance(a, ort.InferenceSession) else ort_session(a)
    sb = b if isinstance(b, ort.InferenceSession) else ort_session(b)
    names_a = [o.name for o in sa.get_outputs()]
    names_b = [o.name for o in sb.get_outputs()]
    if set(names_a) != set(names_b):
        raise AssertionError(
            "graph outputs differ by name: "
            f"only in a={sorted(set(names_a) - set(names_b))}, only in b={sorted(set(names_b) - set(names_a))}")
    out_a = dict(zip(names_a, sa.run(None, _filter_feeds(sa, feeds))))
    out_b = dict(zip(names_b, sb.run(None, _filter_feeds(sb, feeds))))
    problems: list[str] = []
    lines: list[str] = []
    diffs: dict[str, float] = {}
    for name in out_a:
        x, y = np.asarray(out_a[name]), np.asarray(out_b[name])
        if x.shape != y.shape:
            problems.append(f"  {name}: shape mismatch a={tuple(x.shape)} b={tuple(y.shape)}")
            continue
        ok, line = _diff_report(name, x, y, rtol, atol)
        lines.append(line)
        if x.dtype.kind in "fc" and y.dtype.kind in "fc" and x.size:
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            diffs[name] = float(np.nanmax(d)) if np.isfinite(d).any() else float("nan")
        if not ok:
            problems.append(line)
    if problems:
        raise AssertionError("outputs differ:\n" + "\n".join(problems)
                             + "\nall outputs:\n" + "\n".join(lines))
    return diffs


# --------------------------------------------------------------------------
# MAC counting from runtime shapes
# --------------------------------------------------------------------------

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {i.name: tuple(int(d) for d in i.dims) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(int(d) for d in a.t.dims)
                elif a.name in ("value_float", "value_int"):
                    shapes[n.output[0]] = ()
                elif a.name == "value_floats":
                    shapes[n.output[0]] = (len(a.floats),)
                elif a.name == "value_ints":
                    shapes[n.output[0]] = (len(a.ints),)
    return shapes


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is only a hint for dtypes
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def runtime_macs_by_node(model: ModelLike, x_feeds: Mapping[str, np.ndarray] | None = None) -> list[tuple[str, str, int]]:
    """Per-node MACs as ``[(node_name, op_type, macs), ...]`` (see :func:`runtime_macs`)."""
    m = onnx.ModelProto()
    m.CopyFrom(_load(model))
    g = m.graph
    if x_feeds is None:
        x_feeds = random_feeds(m, batch=1)
    const_shapes = _constant_shapes(g)
    feed_shapes = {k: tuple(np.asarray(v).shape) for k, v in x_feeds.items()}
    existing_outputs = {o.name for o in g.output}
    types = _elem_types(m)

    wanted: list[str] = []
    for n in g.node:
        if n.op_type not in _MAC_OPS or n.domain not in ("", "ai.onnx"):
            continue
        for t in (n.input[0], n.input[1], n.output[0]):
            if t and t not in const_shapes and t not in feed_shapes and t not in wanted:
                wanted.append(t)
    for t in wanted:
        if t not in existing_outputs:
            g.output.append(helper.make_tensor_value_info(t, types.get(t, onnx.TensorProto.FLOAT), None))

    sess = ort_session(m)
    out_names = [o.name for o in sess.get_outputs()]
    results = sess.run(None, _filter_feeds(sess, x_feeds))
    shapes = dict(const_shapes)
    shapes.update(feed_shapes)
    shapes.update({name: tuple(np.asarray(v).shape) for name, v in zip(out_names, results)})

    def attr(node, name, default):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    per_node: list[tuple[str, str, int]] = []
    for n in g.node:
        if n.op_type not in _MAC_OPS or n.domain not in ("", "ai.onnx"):
            continue
        a_shape, w_shape, y_shape = shapes[n.input[0]], shapes[n.input[1]], shapes[n.output[0]]
        if n.op_type == "Conv":
            macs = int(np.prod(w_shape)) * int(np.prod(y_shape[2:]))
        elif n.op_type == "ConvTranspose":
            macs = int(np.prod(w_shape)) * int(np.prod(a_shape[2:]))
        elif n.op_type == "Gemm":
            k = a_shape[0] if attr(n, "transA", 0) else a_shape[1]
            macs = int(np.prod(y_shape)) * int(k)
        else:  # MatMul
            k = a_shape[-1]
            macs = int(np.prod(y_shape)) * int(k)
        per_node.append((n.name, n.op_type, int(macs)))
    return per_node


def runtime_macs(model: ModelLike, x_feeds: Mapping[str, np.ndarray] | None = None) -> int:
    """Total multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul nodes.

    Shapes come from what onnxruntime actually produces: every non-constant
    input[0]/input[1]/output[0] of those nodes is exposed as an extra graph
    output and the model is run on ``x_feeds`` (batch 1 expected; default
    :func:`random_feeds` at batch 1).

    * Conv:          prod(W.shape) * prod(Y.shape[2:])
    * ConvTranspose: prod(W.shape) * prod(X.shape[2:])
    * Gemm / MatMul: prod(Y.shape) * K, K = reduction dim of A (transA aware)
    """
    return int(sum(m for _, _, m in runtime_macs_by_node(model, x_feeds)))


# --------------------------------------------------------------------------
# checker
# --------------------------------------------------------------------------

def check_model_full(model: ModelLike) -> None:
    """``onnx.checker.check_model(model, full_check=True)`` (strict shape inference)."""
    if isinstance(model, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(model))
    onnx.checker.check_model(model, full_check=True)
