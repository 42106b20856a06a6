"""Which process this is in a ``torchrun`` job, and the few collective operations training needs.

Launched by ``torchrun --nproc_per_node N -m onnxcc finetune ...`` (or across machines with
``--nnodes``), each process reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment
torchrun sets and joins torch.distributed's default group: NCCL between GPUs, gloo on CPUs.
Without those variables the world is this one process and nothing is initialised.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owned: bool = False   # this module joined the group (and leaves it); a caller's own group stays

    @property
    def main(self) -> bool:
        """The one process that writes files and prints."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes (float64 CPU tensors; gloo and NCCL both carry them)."""
        if self.size > 1:
            dev = t if dist.get_backend() == "gloo" else t.cuda()
            dist.all_reduce(dev)
            t = dev.cpu()
        return t

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def join(device: str) -> World:
    """This process's place in the job, joining the process group when torchrun started several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return World(rank, size, local)
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(rank, size, local, owned=True)


def leave(world: World) -> None:
    world.barrier()
    if world.owned:
        dist.destroy_process_group()


def abandon(world: World) -> None:
    """Leave after a failure: the group goes down without waiting for the others (torchrun then
    stops them)."""
    if world.owned and dist.is_initialized():
        dist.destroy_process_group()
