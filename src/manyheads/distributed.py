"""Multi-process training on torch.distributed: set-up from torchrun's environment, and helpers.

Under ``torchrun --nproc_per_node=N`` each process trains on its shard of the data with
DistributedDataParallel (gloo on CPU, NCCL on GPU); only rank 0 writes files. Every rank
takes its share of the same global batch, so N processes with batch b train like one process
with batch N * b (same rows per step, gradients averaged over them).

    cluster = Cluster.from_env("cuda"); model = cluster.wrap(net); cluster.on_main(print, "rank 0 only")

Every helper is a no-op (or the identity) in a single process, so the training loop calls them
without asking how many processes there are.

:class:`LocalPeers` is the other kind of sharing: the processes of one machine doing one piece of
work once between them (decoding an image cache), through torchrun's store rather than the
process group, so that a call only some processes make cannot hang the others.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity on Linux, else the machine's count).

    pool = ThreadPoolExecutor(usable_cpus())
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


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


JOIN_TIMEOUT_S = 60.0  # how long the first peers to ask wait for the others before each works alone
WAIT_TIMEOUT_S = 6 * 3600.0  # how long a joined peer waits for another's step (a whole decode, at most)
_joins: Counter[str] = Counter()  # how often this process asked to join each piece of work
_leaving: set[str] = set()  # the node stores this process will tell it has left, at exit


@dataclass
class LocalPeers:
    """The processes of this machine (torchrun's local ranks) that joined one piece of shared work.

    :meth:`join` is the only wait without a promise: the local processes that ask for the same
    ``work`` within ``JOIN_TIMEOUT_S`` seconds agree whether all of them are there. If not (a call
    only rank 0 makes, such as the test report after training, or a peer that has exited), every
    process that asked works alone, so nothing hangs. Once joined, :meth:`send` and :meth:`receive`
    pass small picklable values between them through the store torchrun's agent serves (not the
    gloo/NCCL group: its collectives cannot time out or be skipped). Every peer must ask for the
    same pieces of work in the same order; a piece asked for twice is joined twice.

        peers = LocalPeers.join("images:" + key)
        plan = peers.receive("plan") if peers and peers.rank else None
    """

    rank: int
    size: int
    _store: Any = field(repr=False)  # a PrefixStore of this piece of work, one attempt of one node

    @staticmethod
    def present() -> bool:
        """Whether this process has local peers to share work with: torchrun, several processes per machine."""
        env = os.environ
        local = int(env.get("LOCAL_WORLD_SIZE", "1")) > 1
        return local and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and dist.is_available()

    @classmethod
    def join(cls, work: str) -> LocalPeers | None:
        """The local peers, once all of them asked for ``work``; None when alone or they do not all come."""
        if not cls.present():
            return None
        env = os.environ
        node = f"manyheads/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/node{env.get('GROUP_RANK', '0')}"
        store = dist.PrefixStore(node, _agent_store())
        if node not in _leaving:
            _leaving.add(node)
            atexit.register(_leave, store)
        _joins[work] += 1
        name = f"{hashlib.sha256(work.encode()).hexdigest()[:20]}/{_joins[work]}"
        session = dist.PrefixStore(name, store)
        size = int(env["LOCAL_WORLD_SIZE"])
        return cls(int(env.get("LOCAL_RANK", "0")), size, session) if _agree(session, store, size) else None

    def send(self, step: str, value: Any) -> None:
        """Make ``value`` this process's answer to ``step`` (once per step)."""
        self._store.set(f"{step}/{self.rank}", pickle.dumps(value))

    def receive(self, step: str, rank: int = 0) -> Any:
        """Local rank ``rank``'s answer to ``step``, waiting for it (up to ``WAIT_TIMEOUT_S``)."""
        try:
            return pickle.loads(self._store.get(f"{step}/{rank}"))
        except dist.DistStoreError as e:
            raise TimeoutError(
                f"local rank {self.rank} waited {WAIT_TIMEOUT_S:.0f} s for local rank {rank}'s {step!r} "
                "and gave up; that process has probably died (see its own error above)"
            ) from e


@functools.lru_cache(maxsize=1)
def _agent_store() -> dist.Store:
    """A client of the store torchrun's agent serves at MASTER_ADDR:MASTER_PORT (one per process)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=WAIT_TIMEOUT_S))


def _agree(session: Any, node: Any, size: int) -> bool:
    """Whether all ``size`` peers joined ``session``: decided once, by whoever first knows the answer."""
    joined = session.add("joined", 1)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not session.check(["decision"]):
        if joined >= size:
            want = "together"
        elif node.add("gone", 0) > 0 or time.monotonic() > deadline:  # a peer has exited: it will not come
            want = "alone"
        else:
            time.sleep(0.05)
            joined = session.add("joined", 0)
            continue
        session.compare_set("decision", "", want)  # the first decision stands; later ones change nothing
    return session.get("decision") == b"together"


def _leave(node: Any) -> None:
    """At exit: tell the peers still running not to wait for this process."""
    try:
        node.add("gone", 1)
    except Exception:  # the agent's store may already be gone; nobody is left to tell then
        pass
