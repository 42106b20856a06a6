"""Torch-Pruning (torch-pruning==1.6.1) as the baseline the benchmarks compare onnxcc against.

Its progressive recipe: a global pruner with many small iterative steps, stepped until the
requested fraction of the MACs is gone, the final classifier left alone. MACs are counted with
the ONNX counter's rule (Conv2d/Linear weight elements × output positions; BN is fused on export)
so every method in a table is measured the same way.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch


def torch_macs(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Conv2d/Linear MACs at ``input_shape`` from forward hooks."""
    total = 0

    def hook(m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        spatial = int(np.prod(out.shape[2:])) if isinstance(m, torch.nn.Conv2d) else int(np.prod(out.shape[:-1]))
        total += m.weight.numel() * spatial

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(*input_shape))
    for h in handles:
        h.remove()
    return total


def tp_prune(base: torch.nn.Module, criterion: str, target: float, input_shape: tuple[int, ...],
             ignored: list[torch.nn.Module], round_to: int | None = 8,
             gradients: Callable[[torch.nn.Module], None] | None = None,
             progress: Callable[[float], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Prune a copy of ``base`` with L1 magnitude (``"l1"``) or first-order Taylor (``"taylor"``,
    needs ``gradients(model)`` to accumulate fresh gradients before each step) importance until
    ``target`` of its MACs is removed. ``ignored`` names modules of ``base`` to leave intact."""
    import torch_pruning as tp

    model = copy.deepcopy(base).eval()
    names = {id(m): n for n, m in base.named_modules()}
    mods = dict(model.named_modules())
    ignored_copy = [mods[names[id(m)]] for m in ignored]
    if criterion == "l1":
        imp = tp.importance.MagnitudeImportance(p=1)
    elif criterion == "taylor":
        if gradients is None:
            raise ValueError("Taylor importance needs a gradients(model) callback")
        imp = tp.importance.TaylorImportance()
    else:
        raise ValueError(f"unknown criterion {criterion!r}")
    pruner = tp.pruner.BasePruner(model, torch.zeros(*input_shape), importance=imp, global_pruning=True,
                                  pruning_ratio=1.0, iterative_steps=400, round_to=round_to,
                                  ignored_layers=ignored_copy)
    macs0 = macs = torch_macs(model, input_shape)
    steps = 0
    while 1 - macs / macs0 < target and pruner.current_step < pruner.iterative_steps:
        if criterion == "taylor":
            model.zero_grad()
            gradients(model)
        pruner.step()
        macs, steps = torch_macs(model, input_shape), steps + 1
        if progress:
            progress(1 - macs / macs0)
    model.zero_grad(set_to_none=True)
    return model, {"pruner_steps": steps, "torch_mac_reduction": round(1 - macs / macs0, 4)}
