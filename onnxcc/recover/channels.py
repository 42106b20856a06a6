"""Which channels of the original model each tensor of a compressed model still carries.

Pruning keeps tensor names, so a compressed tensor holds the same quantity as the original's
tensor of that name — for the channels it kept. ``compress`` writes the kept channel indices of
every narrowed tensor into the model's metadata (:data:`KEY`), so that recovery, also run later
on its own (``onnxcc recover``), can compare the two models' features channel by channel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import onnx

if TYPE_CHECKING:
    from ..analysis.groups import Analysis

KEY = "onnxcc.kept_channels"


@dataclass(frozen=True)
class Kept:
    """Channels ``index`` (ascending) of the original's axis ``axis`` are what a tensor holds."""

    axis: int
    index: np.ndarray

    def take(self, value: np.ndarray) -> np.ndarray:
        return np.take(value, self.index, axis=self.axis)


ChannelMap = Mapping[str, Kept]


def channel_map(analysis: Analysis, keep: Mapping[int, np.ndarray], tensors: Iterable[str]) -> dict[str, Kept]:
    """The narrowed ``tensors`` under the kept-channel masks ``keep`` (per channel group)."""
    out, keep = {}, dict(keep)
    for t in tensors:
        mask = analysis.mask(t, keep)
        if mask is None or mask.all() or not mask.any():
            continue
        out[t] = Kept(analysis.layout(t).axis, np.flatnonzero(mask))
    return out


def _ranges(index: np.ndarray) -> str:
    """[0 1 2 5 7 8] → '0-2,5,7-8'."""
    parts, start = [], None
    for i, v in enumerate(index):
        if start is None:
            start = v
        if i + 1 == len(index) or index[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def _indices(text: str) -> np.ndarray:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return np.asarray(out, np.int64)


def with_channel_map(model: onnx.ModelProto, cmap: ChannelMap) -> onnx.ModelProto:
    """``model`` (changed in place and returned) with ``cmap`` in its metadata."""
    text = json.dumps({t: [k.axis, _ranges(k.index)] for t, k in cmap.items()}, separators=(",", ":"))
    for p in model.metadata_props:
        if p.key == KEY:
            p.value = text
            return model
    model.metadata_props.add(key=KEY, value=text)
    return model


def read_channel_map(model: onnx.ModelProto) -> dict[str, Kept]:
    """The map ``compress`` wrote into ``model``; empty for a model it did not write."""
    for p in model.metadata_props:
        if p.key == KEY:
            return {t: Kept(int(axis), _indices(idx)) for t, (axis, idx) in json.loads(p.value).items()}
    return {}
