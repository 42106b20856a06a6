"""A read-only view of a model at one concrete input shape: graph, constants, runtime shapes.

Shapes come from onnxruntime itself (every node output exposed once, at batch 1), not from
shape inference: exporters emit graphs that ``onnx.shape_inference`` cannot always follow, but a
model that runs has exact shapes. Small integer tensors (shape vectors, split sizes) are kept as
values too, so rules can tell a computed Reshape target apart from a literal one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputShapeError, UnsupportedModelError
from ..runtime import expose_outputs, make_session

log = logging.getLogger(__name__)

_SMALL_VALUE = 64

_NP_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: old exporters also list initializers as graph inputs."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def batch_fixed_at_one(model: onnx.ModelProto) -> bool:
    """Whether an input of ``model`` is declared with batch 1 (its graph may then hold literal
    1s in Reshape targets, so samples must go through one at a time)."""
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            return True
    return False


def parse_input_shapes(specs: list[str] | None) -> dict[str | None, tuple[int, ...]]:
    """``["1,3,224,224"]`` or ``["images:1,3,640,640", ...]`` → {name or None: shape}."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise InputShapeError(f"bad --input-shape {spec!r}; expected e.g. 1,3,224,224") from None
        if not shape or any(d <= 0 for d in shape):
            raise InputShapeError(f"bad --input-shape {spec!r}; dims must be positive integers")
        shapes[name or None] = shape
    return shapes


def resolve_input_shapes(model: onnx.ModelProto,
                         pinned: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input: pins win; a symbolic leading (batch) dim becomes 1."""
    pinned = dict(pinned or {})
    inputs = graph_inputs(model)
    if None in pinned:  # an unnamed pin applies to the only input
        if len(inputs) != 1:
            raise InputShapeError("the model has several inputs; name them: --input-shape NAME:1,3,224,224")
        pinned[inputs[0].name] = pinned.pop(None)
    unknown = set(pinned) - {i.name for i in inputs}
    if unknown:
        raise InputShapeError(f"--input-shape names unknown input(s) {sorted(unknown)}; "
                              f"inputs are {[i.name for i in inputs]}")
    shapes = {}
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in pinned:
            shape = tuple(int(d) for d in pinned[vi.name])
            if dims and len(shape) != len(dims):
                raise InputShapeError(f"input {vi.name!r} has rank {len(dims)}, got shape {shape}")
            for d, s in zip(dims, shape):
                if d.HasField("dim_value") and d.dim_value != s and d.dim_value > 0:
                    declared = [x.dim_value if x.HasField("dim_value") else (x.dim_param or "?") for x in dims]
                    raise InputShapeError(
                        f"input {vi.name!r} is declared with fixed shape {declared}, which --input-shape "
                        f"{','.join(map(str, shape))} cannot change: export it with dynamic axes or make them "
                        "symbolic (onnx.tools.update_model_dims.update_inputs_outputs_dims)")
            shapes[vi.name] = shape
            continue
        out = []
        for k, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                out.append(d.dim_value)
            elif k == 0:
                out.append(1)
            else:
                raise InputShapeError(f"input {vi.name!r} has a dynamic dim {k} "
                                      f"({d.dim_param or '?'}); pin it with --input-shape")
        if not dims:
            raise InputShapeError(f"input {vi.name!r} has no shape; pin it with --input-shape")
        shapes[vi.name] = tuple(out)
    return shapes


def input_dtype(vi: onnx.ValueInfoProto):
    return _NP_DTYPES.get(vi.type.tensor_type.elem_type, np.float32)


def random_feeds(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                 batch: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in graph_inputs(model):
        shape = shapes[vi.name] if batch is None else (batch,) + tuple(shapes[vi.name][1:])
        dt = input_dtype(vi)
        if np.issubdtype(dt, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(dt)
        else:
            feeds[vi.name] = np.zeros(shape, dt)
    return feeds


@dataclass
class ModelView:
    """Graph + constants + runtime shapes of a normalized model at one input shape."""

    model: onnx.ModelProto
    graph: gs.Graph
    input_shapes: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    @cached_property
    def producer(self) -> dict[str, int]:
        """Index in :attr:`nodes` of the node that computes each tensor."""
        return {o.name: i for i, n in enumerate(self.nodes) for o in n.outputs}

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return None

    def shape(self, t: gs.Tensor | str) -> tuple[int, ...] | None:
        name = t if isinstance(t, str) else t.name
        if name in self.shapes:
            return self.shapes[name]
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        return None

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        c = self.const(t)
        return c if c is not None else self.values.get(t.name)


def build_view(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
               feeds: dict[str, np.ndarray] | None = None) -> ModelView:
    """Import into onnx-graphsurgeon and record every tensor's runtime shape at batch 1."""
    graph = gs.import_onnx(model)
    graph.toposort()
    feeds = feeds if feeds is not None else random_feeds(model, input_shapes)
    names = [t.name for n in graph.nodes for t in n.outputs if t.name]
    try:
        sess = make_session(expose_outputs(model, names), optimize="none")
        outs = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UnsupportedModelError(f"onnxruntime cannot run the model at input shapes "
                                    f"{input_shapes}: {str(e).splitlines()[0][:300]}") from None
    view = ModelView(model, graph, input_shapes)
    for o, v in zip(sess.get_outputs(), outs):
        arr = np.asarray(v)
        view.shapes[o.name] = tuple(arr.shape)
        if arr.size <= _SMALL_VALUE and arr.dtype.kind in "iu":
            view.values[o.name] = arr
    for name, shape in input_shapes.items():
        view.shapes[name] = tuple(shape)
    return view
