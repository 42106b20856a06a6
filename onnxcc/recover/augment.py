"""Image augmentation for recovery: random resized crops, horizontal flips and mixing of the inputs.

A few hundred calibration images are few for tuning weights; distillation needs no labels, so
any plausible image is a training sample — the original model says what the answer is. Crops and
flips are drawn per sample and applied by one ``grid_sample`` on preprocessed tensors, in either
layout. Each image is then blended with another of the batch (mixup with the original's
answer as the target, the "function matching" of patient distillation): the blends lie between
the samples, where a few hundred of them leave the student unconstrained. Inputs that are not
images (audio, tokens, features) are left as they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_SIDE = 16
SCALE = (0.35, 1.0)            # area of the crop, as a fraction of the image
RATIO = (3 / 4, 4 / 3)
MIX = 0.4                      # the other image's weight in a blend, at most (drawn uniformly)


def image_layout(shape: tuple[int, ...]) -> str | None:
    """'NCHW' or 'NHWC' for a batch of 1-, 3- or 4-channel images; None for other inputs."""
    if len(shape) != 4:
        return None
    if shape[1] in (1, 3, 4) and min(shape[2:]) >= MIN_SIDE:
        return "NCHW"
    if shape[3] in (1, 3, 4) and min(shape[1:3]) >= MIN_SIDE:
        return "NHWC"
    return None


def augment(x: torch.Tensor, layout: str, generator: torch.Generator,
            scale: tuple[float, float] = SCALE, mix: float | None = None) -> torch.Tensor:
    """Each image of ``x`` cropped at random (area in ``scale``, aspect in RATIO), resized back
    to its size, flipped left-right with probability 1/2, and blended with another image of the
    batch at a weight drawn from [0, ``mix``] (MIX unless given)."""
    mix = MIX if mix is None else mix
    nchw = x if layout == "NCHW" else x.permute(0, 3, 1, 2)
    n = nchw.shape[0]
    rand = torch.rand(n, 5, generator=generator).to(x.device)
    area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
    log_r = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * rand[:, 1]
    aspect = torch.exp(log_r)
    sw = torch.sqrt(area * aspect).clamp(max=1.0)   # half-extent of the crop in [-1, 1] units
    sh = torch.sqrt(area / aspect).clamp(max=1.0)
    tx = (1 - sw) * (2 * rand[:, 2] - 1)
    ty = (1 - sh) * (2 * rand[:, 3] - 1)
    flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0).to(x.device)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sw * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sh, ty
    grid = F.affine_grid(theta, list(nchw.shape), align_corners=False)
    out = F.grid_sample(nchw, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if mix > 0 and n > 1:
        other = (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n   # never itself
        w = (mix * torch.rand(n, 1, 1, 1, generator=generator)).to(x.device, x.dtype)
        out = (1 - w) * out + w * out[other.to(x.device)]
    return out if layout == "NCHW" else out.permute(0, 2, 3, 1).contiguous()
