"""Dynamic Weight Average: weight heads by how slowly their losses fall.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (eq. 7):
``w_h(t) = K * softmax_h(r_h(t-1) / T)`` with ``r_h(t-1) = L_h(t-1) / L_h(t-2)`` the ratio of a
head's mean train losses over the last two epochs, ``K`` heads and temperature ``T = 2``.
The first two epochs use weight 1 for every head.

    mh.fit(net, df, weights="dwa")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from manyheads.balancing.base import Balancer, Scale
from manyheads.losses import ResolvedLosses


def dwa_weights(previous: Sequence[float], before: Sequence[float], temperature: float = 2.0) -> list[float]:
    """DWA weights from the losses of the last epoch and the one before (1 where a ratio is undefined).

    dwa_weights([0.5, 0.9], [1.0, 1.0])  # the head whose loss fell less gets more weight
    """
    ratios = [p / b if math.isfinite(p) and math.isfinite(b) and b > 0 else 1.0 for p, b in zip(previous, before)]
    soft = torch.softmax(torch.tensor(ratios, dtype=torch.float64) / temperature, dim=0)
    return (len(ratios) * soft).tolist()


class DWA(Balancer):
    """Dynamic Weight Average (Liu et al. 2019): weights from the ratio of the last two epochs' losses."""

    name = "dwa"

    def __init__(
        self,
        losses: ResolvedLosses,
        normalizers: Mapping[str, float] | None = None,
        temperature: float = 2.0,
        *,
        scale: Scale = None,
    ) -> None:
        super().__init__(losses, normalizers, scale=scale)
        self.temperature = temperature
        self.register_buffer("current", torch.ones(len(self.heads)))

    def start_epoch(self, epoch: int, train_losses: list[dict[str, float]]) -> None:
        if len(train_losses) < 2:
            self.current.fill_(1.0)
            return
        previous = [train_losses[-1].get(name, math.nan) for name in self.heads]
        before = [train_losses[-2].get(name, math.nan) for name in self.heads]
        self.current.copy_(torch.tensor(dwa_weights(previous, before, self.temperature)))

    def objective(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * loss for w, loss in zip(self.current, self.based(losses)))

    def weights(self) -> dict[str, float]:
        return {name: self.base[name] * w for name, w in zip(self.heads, self.current.tolist())}
