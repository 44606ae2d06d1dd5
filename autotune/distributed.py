"""This process's place in the group torchrun starts: shared by sweeps (`autotune.tuner`) and by
training (`workbench.train_distributed`), so both join and leave the group the same way."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and local rank (the GPU index on a node); rank 0 owns the database."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, use_cuda: bool | None = None) -> "Distributed | None":
        """The group torchrun describes in the environment, joined here if no one has yet (nccl on the
        local GPU with `use_cuda`, else gloo; by default CUDA where the Triton kernels launch on it);
        None when not under torchrun."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        import torch
        import torch.distributed as dist

        from triton_workbench.kernels import runtime

        if use_cuda is None:
            use_cuda = runtime.default_device().type == "cuda"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` in rank order on rank 0; None on the others."""
        import torch.distributed as dist

        boxes = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, boxes, dst=0)
        return boxes


def leave_process_group(together: bool) -> None:
    """Leave the torchrun group, if one was joined. After finished work the ranks leave together (a
    barrier, once every DDP wrapper is gone), since a rank tearing gloo down while its peer still talks
    can abort; after a failure there is no barrier, so no rank waits on a dead peer."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    gc.collect()  # DDP reducers hold the group: release them before it goes
    if together:
        dist.barrier()
    dist.destroy_process_group()
