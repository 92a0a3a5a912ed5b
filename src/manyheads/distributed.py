"""Multi-process training on torch.distributed: set-up from torchrun's environment, and helpers.

Under ``torchrun --nproc_per_node=N`` each process trains on its shard of the data with
DistributedDataParallel (gloo on CPU, NCCL on GPU); only rank 0 writes files.

    cluster = Cluster.from_env("cuda"); model = cluster.wrap(net)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Cluster:
    """Who this process is among its peers; a single process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: str | torch.device) -> Cluster:
        """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, net: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``net`` when there are peers."""
        if self.world == 1:
            return net
        device_ids = [net_device.index] if (net_device := next(net.parameters()).device).type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (in place); identity for one process."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
