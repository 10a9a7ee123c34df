"""Training under ``torchrun``: the process group and the few collective steps the trainer needs.

With one process (no ``WORLD_SIZE`` > 1) every helper is a no-op, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed


@dataclass
class Dist:
    """This process's place in the job; ``created`` when the trainer made the process group (and ends it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        if self.world > 1:
            for buf in model.buffers():
                torch.distributed.broadcast(buf, 0)

    def sum(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) ``tensors`` in place."""
        if self.world > 1:
            for t in tensors:
                torch.distributed.all_reduce(t)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order."""
        if self.world <= 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.created:
            torch.distributed.destroy_process_group()


def init_distributed(device_name: str) -> Dist:
    """Join (or create, nccl on CUDA and gloo on CPU) the process group that ``torchrun`` describes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, created=created)
