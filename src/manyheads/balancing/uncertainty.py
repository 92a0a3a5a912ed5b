"""Uncertainty weighting: each head learns a log-variance that sets its weight.

Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR 2018. With ``s_h = log sigma_h^2`` learned per head, the paper's
regression objective is ``0.5 * exp(-s_h) * L_h + 0.5 * s_h`` (its eq. 7). We minimise twice
that, ``exp(-s_h) * L_h + s_h`` (the common form of the published code), so a head's weight
``exp(-s_h)`` starts at 1 like constant weighting and settles near ``1 / L_h``: a noisy head,
whose loss cannot fall, ends up weighted less.

    mh.fit(net, df, weights="uncertainty")
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from manyheads.balancing.base import Balancer, Scale, average_over_ranks
from manyheads.losses import ResolvedLosses


class Uncertainty(Balancer):
    """Learned homoscedastic-uncertainty weights ``exp(-s_h)`` (Kendall et al. 2018)."""

    name = "uncertainty"

    def __init__(
        self, losses: ResolvedLosses, normalizers: Mapping[str, float] | None = None, *, scale: Scale = None
    ) -> None:
        super().__init__(losses, normalizers, scale=scale)
        self.log_vars = nn.Parameter(torch.zeros(len(self.heads)))  # s_h, trained with the heads

    def start_epoch(self, epoch: int, train_losses: list[dict[str, float]]) -> None:
        # Under torchrun each process steps s_h on its own shard: re-align them once an epoch.
        with torch.no_grad():
            average_over_ranks(self.log_vars.data)

    def objective(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        based = torch.stack([loss.float() for loss in self.based(losses)])
        # A head without labels in this batch has loss exactly 0: leave out its regulariser too,
        # else s_h of a sparsely labelled head is pushed down (its weight up) on every such batch.
        present = (based.detach() != 0).to(based.dtype)
        return (torch.exp(-self.log_vars) * based + present * self.log_vars).sum()

    def weights(self) -> dict[str, float]:
        precision = torch.exp(-self.log_vars.detach()).tolist()
        return {name: self.base[name] * p for name, p in zip(self.heads, precision)}
