"""What each graph output is trained on, and the teacher that provides the targets.

A final Softmax/LogSoftmax or a 2-D ``(N, classes)`` output is a class-score head (KL divergence
on its logits, cross-entropy against labels); anything else (boxes, dense maps) is matched by
mean squared error. No torch import here: :func:`rows` works on any tensor with torch's methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import helper

from ..runtime import expose_outputs, make_session

__all__ = ["Head", "heads", "rows", "rows_shape", "slices", "Teacher"]


@dataclass(frozen=True)
class Head:
    """What one graph output is trained on: its class scores (axis set) or its values (MSE)."""

    tensor: str
    axis: int | None
    coerce: bool  # Softmax before opset 13: the classes are all dims from `axis` on


def heads(model: onnx.ModelProto) -> list[Head]:
    producers = {o: n for n in model.graph.node for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    found = []
    for out in model.graph.output:
        node = producers.get(out.name)
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
        if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            found.append(Head(node.input[0], attrs.get("axis", 1 if opset < 13 else -1), opset < 13))
        elif len(dims) == 2 and dims[1] != 1:  # (N, classes) scores without a Softmax (a Gemm head)
            found.append(Head(out.name, 1, False))
        else:
            found.append(Head(out.name, None, False))
    return found


def rows_shape(shape: tuple[int, ...], head: Head) -> tuple[int, int]:
    a = head.axis % len(shape)
    if head.coerce:
        return math.prod(shape[:a]), math.prod(shape[a:])
    return math.prod(shape) // shape[a], shape[a]


def rows(t: Any, head: Head) -> Any:
    """Class scores as (rows, classes), the layout KL divergence and cross-entropy work on."""
    shape = rows_shape(tuple(t.shape), head)
    return (t if head.coerce else t.movedim(head.axis % t.ndim, -1)).reshape(shape)


def slices(run: Callable[[dict[str, Any]], list[Any]], feeds: Mapping[str, Any], fixed: int | None,
           cat: Callable[[list[Any]], Any]) -> list[Any]:
    """``run`` on the whole batch, or on slices of exactly ``fixed`` samples, the last one padded
    by repeating its final sample (the padding's outputs are dropped)."""
    n = len(next(iter(feeds.values())))
    if fixed is None:
        return run(dict(feeds))
    parts = []
    for i in range(0, n, fixed):
        part = {k: v[i:i + fixed] for k, v in feeds.items()}
        short = fixed - len(next(iter(part.values())))
        if short:
            part = {k: cat([v, v[-1:].repeat_interleave(short, 0) if hasattr(v, "repeat_interleave")
                            else v[-1:].repeat(short, 0)]) for k, v in part.items()}
        parts.append([o[:fixed - short] for o in run(part)])
    return [cat(list(p)) for p in zip(*parts)]


class Teacher:
    """The original model in onnxruntime, run on each batch as training reaches it (never stored
    for the whole set); in slices of its ``fixed`` batch size where the graph has one."""

    def __init__(self, teacher: onnx.ModelProto, found: list[Head], fixed: int | None, provider: str):
        self.heads = found
        self.names = [h.tensor for h in found]
        self.session = make_session(expose_outputs(teacher, self.names), provider)
        self.fixed = fixed

    def outputs(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return slices(lambda part: self.session.run(self.names, part), feeds, self.fixed, np.concatenate)
