"""BatchNorm re-inserted after each Conv for training, folded back into the Conv on export.

Exported models carry BatchNorm folded into their Convs, so fine-tuning trains plain
convolutions; a torch pipeline trains with BatchNorm on batch statistics. This puts a BatchNorm
back after every Conv with a bias and an unshared weight, initialised from the statistics of the
Conv's output on the training samples so that, in eval mode, it is exactly the identity. After
training its running statistics and affine are folded into the Conv's weight and bias: the
exported graph keeps its nodes and shapes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from .executor import OnnxModule

EPS = 1e-5
Reduce = Callable[[torch.Tensor], torch.Tensor]   # sums a float64 CPU tensor over processes


class _Moments:
    """Per-channel sums of x and x² (float64) and the count of values, over tensors (N, C, ...)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.n = 0

    def add(self, t: torch.Tensor) -> None:
        flat = t.detach().transpose(0, 1).reshape(t.shape[1], -1).double()
        part = torch.stack([flat.sum(1), flat.square().sum(1)])
        self.sums = part if self.sums is None else self.sums + part
        self.n += flat.shape[1]

    def mean_var(self, reduce: Reduce | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean, biased variance and count; with ``reduce`` summed over processes first."""
        sums, n = self.sums, self.n
        if reduce is not None:
            total = reduce(torch.cat([sums.flatten().cpu(), torch.tensor([float(n)], dtype=torch.float64)]))
            sums, n = total[:-1].view_as(sums).to(self.sums.device), int(total[-1])
        mean = sums[0] / n
        return mean, (sums[1] / n - mean.square()).clamp(min=0), n


class Renorm(torch.nn.Module):
    """BatchNorm over axis 1 of a tensor of any rank (torch's semantics: batch statistics and a
    momentum update while training, running statistics in eval). With ``sync`` the statistics are
    those of the global batch, summed over torch.distributed's processes (as SyncBatchNorm), so
    several processes train as one would on their batches together."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, momentum: float = 0.1, sync: bool = False):
        super().__init__()
        self.momentum, self.sync = momentum, sync
        self.measured: _Moments | None = None   # while recalibrating: what reaches it
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.weight = torch.nn.Parameter(torch.sqrt(var + EPS))   # identity on these statistics
        self.bias = torch.nn.Parameter(mean.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            if self.measured is not None:
                self.measured.add(x)
            mean, var, n = self._batch_statistics(x, sync=self.sync and self.measured is None)
            if self.measured is None:
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var * n / max(1, n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS) * self.weight.view(shape) + self.bias.view(shape)

    def _batch_statistics(self, x: torch.Tensor, sync: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and (biased) variance of the batch, and the values per channel; sums
        are taken around the running mean, which keeps E[x²] - E[x]² from cancelling."""
        dims = [d for d in range(x.ndim) if d != 1]
        centred = x - self.running_mean.view((1, -1) + (1,) * (x.ndim - 2))
        sums = torch.cat([centred.sum(dims), centred.square().sum(dims)])
        n = x.numel() // x.shape[1]
        if sync:
            from torch.distributed.nn.functional import all_reduce   # differentiable, unlike dist.all_reduce

            sums = all_reduce(sums)
            count = torch.tensor([float(n)], device=x.device)
            torch.distributed.all_reduce(count)
            n = int(count.item())
        shift, sq = sums.chunk(2)
        offset = shift / n
        return self.running_mean + offset, (sq / n - offset.square()).clamp(min=0), n

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
def insert(module: OnnxModule, batches: Iterable[Mapping[str, torch.Tensor]], sync: bool = False,
           reduce: Reduce | None = None) -> int:
    """Put a :class:`Renorm` after each eligible Conv, initialised on ``batches`` (their moments
    summed over processes by ``reduce`` where each process has its own); returns how many."""
    convs = _convs(module)
    names = [out for out, _, _ in convs]
    moments = [_Moments() for _ in names]
    for feeds in batches:
        for m, t in zip(moments, module.run(feeds, names)):
            m.add(t)
    params = module.onnx_parameters()
    for (out, _, bias), m in zip(convs, moments):
        mean, var, _ = m.mean_var(reduce)
        ref = params[bias]
        module.apply_after(out, Renorm(mean.to(ref), var.to(ref), sync=sync))
        # the BatchNorm subtracts the batch mean, so the bias has no gradient: only rounding noise,
        # which Adam would scale up to full steps. Its shift takes the bias's place.
        ref.requires_grad_(False)
    return len(convs)


@torch.no_grad()
def recalibrate(module: OnnxModule, batches: Iterable[Mapping[str, torch.Tensor]], reduce: Reduce | None = None) -> None:
    """Running statistics measured afresh under the current weights (the momentum's average lags
    the weights, most after few steps): a forward in training mode over ``batches``, each
    BatchNorm pooling what reaches it over all their samples. Given the same samples, every
    process does the same unsynchronised, so the result does not depend on how many there are;
    given each its own (the caller's sharded batches), ``reduce`` sums the moments over them."""
    renorms = {out: module.applied_after(out) for out, _, _ in _convs(module)}
    renorms = {out: m for out, m in renorms.items() if m is not None}
    mode = module.training
    for m in renorms.values():
        m.measured = _Moments()
    module.train()
    for feeds in batches:
        module.run(feeds, list(renorms))
    for m in renorms.values():
        mean, var, n = m.measured.mean_var(reduce)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var * n / max(1, n - 1))
        m.measured = None
    module.train(mode)


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
        b.requires_grad_(True)
        module.apply_after(out, None)
