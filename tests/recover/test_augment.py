"""Recovery's image augmentation: crops and flips keep the layout, blends mix two images of the batch."""
from __future__ import annotations

import pytest
import torch

from onnxcc.recover.augment import augment, image_layout


def _batch(n: int = 6) -> torch.Tensor:
    # one constant image per sample: every blend of two of them is constant too, at a value between them
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 20, 20).contiguous()


def test_layouts_are_recognised_and_others_left_alone():
    assert image_layout((2, 3, 32, 32)) == "NCHW" and image_layout((2, 32, 32, 3)) == "NHWC"
    assert image_layout((2, 80, 100)) is None and image_layout((2, 3, 8, 8)) is None


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_without_blending_each_image_stays_itself(layout):
    x = _batch()
    y = augment(x if layout == "NCHW" else x.permute(0, 2, 3, 1), layout, torch.Generator().manual_seed(0), mix=0.0)
    y = y if layout == "NCHW" else y.permute(0, 3, 1, 2)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x)   # a crop or flip of a constant image is that image


def test_blends_mix_each_image_with_another_at_most_at_the_given_weight():
    x = _batch()
    y = augment(x, "NCHW", torch.Generator().manual_seed(0), mix=0.4)
    own = torch.arange(6, dtype=torch.float32)
    values = y.flatten(1)
    assert torch.allclose(values, values[:, :1].expand_as(values), atol=1e-5)   # still one value per image
    moved = (values[:, 0] - own).abs()
    assert (moved > 1e-4).all()    # every image took some of another (never of itself)
    assert (moved <= 0.4 * 5 + 1e-5).all()
    y2 = augment(x, "NCHW", torch.Generator().manual_seed(0), mix=0.4)
    torch.testing.assert_close(y, y2)   # drawn from the generator alone


def test_a_single_image_is_not_blended():
    x = _batch(1)
    torch.testing.assert_close(augment(x, "NCHW", torch.Generator().manual_seed(0), mix=0.4), x)
