"""Regression rows of a layer's input against torch's unfold (an independent im2col)."""
import numpy as np
import onnx_graphsurgeon as gs
import pytest
import torch

from onnxcc.search import refit as reconstruct


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
