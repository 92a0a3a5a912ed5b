"""Multi-process training on torch.distributed: set-up from torchrun's environment, and helpers.

Under ``torchrun --nproc_per_node=N`` each process trains on its shard of the data with
DistributedDataParallel (gloo on CPU, NCCL on GPU); only rank 0 writes files. Every rank
takes its share of the same global batch, so N processes with batch b train like one process
with batch N * b (same rows per step, gradients averaged over them).

    cluster = Cluster.from_env("cuda"); model = cluster.wrap(net); cluster.on_main(print, "rank 0 only")

Every helper is a no-op (or the identity) in a single process, so the training loop calls them
without asking how many processes there are.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


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
            cuda = torch.device(device).type == "cuda"
            if cuda:  # NCCL binds each process to its own GPU
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @staticmethod
    def is_main_process() -> bool:
        """Whether this process is rank 0 under torchrun (RANK), or a single process; joins no group."""
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def single(self) -> bool:
        """One process: no peers, no DistributedDataParallel wrapper."""
        return self.world == 1

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)`` on rank 0 only (writing files, printing); None on the other ranks."""
        return fn(*args, **kwargs) if self.is_main else None

    def local_device(self, device: str | torch.device) -> torch.device:
        """This process's device: under torchrun each process takes its own GPU (LOCAL_RANK)."""
        device = torch.device(device)
        if self.world > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

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

    def any(self, flags: torch.Tensor) -> bool:
        """Whether any element of ``flags`` is true on any process (one host sync)."""
        return bool(self.sum(flags.sum()) > 0)

    def agree(self, value: int) -> int:
        """Rank 0's integer on every rank (e.g. a random seed drawn per process)."""
        if self.world == 1:
            return value
        device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate an equally shaped tensor from all ranks along dim 0 (rank order)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        """Wait for every process (a no-op for one)."""
        if self.world > 1:
            dist.barrier()
