"""Each training process's part in the group: joining it, its device, its shard of every epoch, and the
closing check that all ranks ended with the same parameters. A run outside torchrun is a group of one."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from triton_workbench.autotune.distributed import Distributed
from triton_workbench.kernels import runtime
from triton_workbench.kernels.errors import UsageError
from triton_workbench.workbench.checkpoint import parameters_sha256
from triton_workbench.workbench.data import ImageSet


def init_distributed(kernels: str) -> Distributed:
    """Join the group torchrun describes (a group of one outside torchrun): nccl when the model lives
    on a GPU, gloo when it runs on the CPU (our kernels in the interpreter)."""
    use_cuda = torch.cuda.is_available() and not (kernels == "triton" and runtime.INTERPRETER)
    return Distributed.from_environment(use_cuda) or Distributed()


def training_device(kernels: str, distributed: Distributed) -> torch.device:
    """Where the model lives: the kernels' device for triton (CPU in the interpreter), else CUDA if present."""
    if kernels == "triton":
        device = runtime.default_device()
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank)
        torch.cuda.set_device(device)
    return device


def epoch_batches(train: ImageSet, batch_size: int, seed: int, epoch: int, distributed: Distributed) -> list[list[int]]:
    """This rank's batches for `epoch`: a seeded shuffle sharded by DistributedSampler, last partial batch dropped."""
    sampler = DistributedSampler(
        train, num_replicas=distributed.world_size, rank=distributed.rank, shuffle=True, seed=seed
    )
    sampler.set_epoch(epoch)
    indices = list(sampler)
    if len(indices) < batch_size:
        raise UsageError(f"batch_size {batch_size} exceeds the {len(indices)} training images per process")
    return [indices[start : start + batch_size] for start in range(0, len(indices) - batch_size + 1, batch_size)]


def check_ranks_agree(model: nn.Module, distributed: Distributed) -> str:
    """Every rank's parameters are gathered and compared; rank 0 reports, a mismatch raises."""
    checksum = parameters_sha256(model)
    if not distributed.enabled:
        return checksum
    flat = torch.cat([parameter.detach().flatten().float() for parameter in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(distributed.world_size)]
    dist.all_gather(gathered, flat)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(f"parameters differ between rank 0 and ranks {differing}: gradients were not synchronised")
    if distributed.is_main:
        print(f"ddp: parameters identical on all {distributed.world_size} ranks (sha256 {checksum})")
    return checksum
