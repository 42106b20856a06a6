"""BatchNorm re-inserted after each Conv for training, folded back into the Conv on export.

Exported models carry BatchNorm folded into their Convs, so fine-tuning trains plain
convolutions; a torch pipeline trains with BatchNorm on batch statistics. This puts a BatchNorm
back after every Conv with a bias and an unshared weight, initialised from the statistics of the
Conv's output on the training samples so that, in eval mode, it is exactly the identity. After
training its running statistics and affine are folded into the Conv's weight and bias: the
exported graph keeps its nodes and shapes.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .executor import OnnxModule

EPS = 1e-5


class Renorm(torch.nn.Module):
    """BatchNorm over axis 1 of a tensor of any rank (torch's semantics: batch statistics and a
    momentum update while training, running statistics in eval)."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.weight = torch.nn.Parameter(torch.sqrt(var + EPS))   # identity on these statistics
        self.bias = torch.nn.Parameter(mean.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            dims = [d for d in range(x.ndim) if d != 1]
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / max(1, n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * self.weight.view(shape) + self.bias.view(shape)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``y = x * scale + shift`` in eval mode."""
        scale = self.weight / torch.sqrt(self.running_var + EPS)
        return scale, self.bias - self.running_mean * scale


def _convs(module: OnnxModule) -> list[tuple[str, str, str]]:
    """(output, weight, bias) of every Conv whose weight and bias are trainable and read by it alone."""
    params = module.onnx_parameters()
    readers: dict[str, int] = {}
    for node in module.nodes():
        for i in node.inputs:
            readers[i] = readers.get(i, 0) + 1
    return [(n.outputs[0], n.inputs[1], n.inputs[2]) for n in module.nodes()
            if n.op == "Conv" and len(n.inputs) > 2 and n.inputs[1] in params and n.inputs[2] in params
            and readers[n.inputs[1]] == 1 and readers[n.inputs[2]] == 1]


@torch.no_grad()
def insert(module: OnnxModule, batches: Iterable[Mapping[str, torch.Tensor]]) -> int:
    """Put a :class:`Renorm` after each eligible Conv, initialised on ``batches``; returns how many."""
    convs = _convs(module)
    names = [out for out, _, _ in convs]
    sums: list[torch.Tensor | None] = [None] * len(names)
    count = [0] * len(names)
    for feeds in batches:
        for k, t in enumerate(module.run(feeds, names)):
            flat = t.transpose(0, 1).reshape(t.shape[1], -1).double()
            part = torch.stack([flat.sum(1), (flat * flat).sum(1)])
            sums[k] = part if sums[k] is None else sums[k] + part
            count[k] += flat.shape[1]
    for (out, _, _), s, n in zip(convs, sums, count):
        mean = s[0] / n
        var = (s[1] / n - mean * mean).clamp(min=0)
        ref = module.onnx_parameters()[convs[0][1]]
        module.apply_after(out, Renorm(mean.to(ref), var.to(ref)))
    return len(convs)


@torch.no_grad()
def fold(module: OnnxModule) -> None:
    """Fold every inserted :class:`Renorm` into its Conv and remove it (exact in eval mode)."""
    params = module.onnx_parameters()
    for out, weight, bias in _convs(module):
        renorm = module.applied_after(out)
        if renorm is None:
            continue
        scale, shift = renorm.scale_shift()
        w, b = params[weight], params[bias]
        w.mul_(scale.view((-1,) + (1,) * (w.ndim - 1)))
        b.copy_(b * scale + shift)
        module.apply_after(out, None)
