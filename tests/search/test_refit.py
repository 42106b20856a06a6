"""Regression rows of a layer's input against torch's unfold (an independent im2col)."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from onnxcc.search import refit as reconstruct
from onnxcc.search.statistics import MomentSums


def _conv(cin: int, k: int, stride: int, pad: int, dilation: int) -> gs.Node:
    w = gs.Constant("w", np.zeros((4, cin, k, k), np.float32))
    return gs.Node("Conv", inputs=[gs.Variable("x"), w],
                   attrs={"pads": [pad] * 4, "strides": [stride] * 2, "dilations": [dilation] * 2})


def _unfold(x: np.ndarray, k: int, stride: int, pad: int, dilation: int) -> np.ndarray:
    cols = torch.nn.functional.unfold(torch.from_numpy(x), k, dilation=dilation, padding=pad, stride=stride)
    return cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy()   # rows ordered (image, position)


@pytest.mark.parametrize("k,stride,pad,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (3, 1, 2, 2), (5, 2, 0, 1)])
def test_conv_rows_are_the_input_patches(k, stride, pad, dilation):
    x = np.random.default_rng(0).standard_normal((3, 5, 11, 9)).astype(np.float32)
    r = reconstruct.rows(x, _conv(5, k, stride, pad, dilation))
    np.testing.assert_array_equal(r, _unfold(x, k, stride, pad, dilation))


def test_subsampled_rows_are_distinct_patches(monkeypatch):
    monkeypatch.setattr(reconstruct, "MAX_ROWS", 50)
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    r = reconstruct.rows(x, _conv(3, 3, 1, 1, 1))
    full = {row.tobytes() for row in _unfold(x, 3, 1, 1, 1)}
    assert r.shape == (50, 27)
    assert len({row.tobytes() for row in r}) == 50 and all(row.tobytes() in full for row in r)


@pytest.mark.parametrize("max_rows", [50, 10 ** 6])
def test_rows_streamed_in_parts_are_the_whole_sets_rows(monkeypatch, max_rows):
    monkeypatch.setattr(reconstruct, "MAX_ROWS", max_rows)
    x = np.random.default_rng(2).standard_normal((7, 3, 10, 10)).astype(np.float32)
    node = _conv(3, 3, 1, 1, 1)
    whole = reconstruct.rows(x, node)
    parts = np.concatenate([reconstruct.rows(x[i:i + 3], node, span=(i, len(x))) for i in range(0, len(x), 3)])
    assert len(parts) == len(whole) == min(max_rows, 7 * 100)
    key = lambda r: r[np.lexsort(r.T[::-1])]   # the same rows, in any order
    np.testing.assert_array_equal(key(parts), key(whole))


def test_moments_summed_over_streamed_parts_are_the_whole_sets():
    """The float32 sums accumulated in place, part by part, are the float64 moments of all rows."""
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 40)).astype(np.float32) for n in (7, 50, 1)]
    targets = [p + 0.1 * rng.standard_normal(p.shape).astype(np.float32) for p in parts]
    sums = MomentSums()
    for p, t in zip(parts, targets):
        sums.add("towards", p, t, True)
        sums.add("same", p, None, True)
    stats = sums.stats()
    z = np.concatenate([np.concatenate(parts), np.ones((58, 1))], 1)
    t = np.concatenate([np.concatenate(targets), np.ones((58, 1))], 1)
    S, C = stats.moments["towards"]
    np.testing.assert_allclose(S, z.T @ z / 58, atol=1e-5)
    np.testing.assert_allclose(C, t.T @ z / 58, atol=1e-5)
    S_same, C_same = stats.moments["same"]
    assert C_same is S_same
    np.testing.assert_allclose(S_same, S)
    np.testing.assert_allclose(stats.energy["same"], (z[:, :-1] ** 2).mean(0), rtol=1e-5)
