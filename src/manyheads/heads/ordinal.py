"""Ordinal: ordered classes (e.g. age bins) as k - 1 CORN thresholds, judged by the MAE in bins."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from manyheads.heads.base import register
from manyheads.heads.binary import _logit
from manyheads.heads.categorical import Categorical


@register("ordinal")
class Ordinal(Categorical):
    """Ordered classes (e.g. age bins). Default loss ``"corn"``; metrics accuracy and MAE in bins.

    Outputs k - 1 logits, one per threshold "rank > j" (CORN, Shi et al. 2021).

        mh.Ordinal(["0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69", "70+"])
    """

    default_loss = "corn"
    losses: ClassVar[frozenset[str]] = frozenset({"corn", "cross_entropy"})
    loss_variants: ClassVar[dict[str, str]] = {}
    primary = "mae_bins"
    higher_is_better = False
    # the answer is where the chained sigmoids cross 1/2, and a temperature moves that point (argmax kinds keep theirs)
    calibration_keeps_answers: ClassVar[bool] = False

    @property
    def out_features(self) -> int:
        return len(self.labels) - 1

    @property
    def squeeze(self) -> bool:
        return False  # [B, k - 1] even for two classes

    def loss_inputs(self, output, target, loss, scale=1.0):
        output, target = super().loss_inputs(output, target, loss, scale)
        if loss == "cross_entropy":  # over the class probabilities the thresholds imply
            output = self.proba(output).clamp_min(1e-7).log()
        return output, target

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        tail = self._prior(target).flip(0).cumsum(0).flip(0)  # CORN logits of the prior: P(rank > j | rank >= j)
        return _logit(tail[1:] / tail[:-1]).expand(len(target), -1).clone()

    def _above(self, output: torch.Tensor) -> torch.Tensor:
        """P(rank > j) per threshold: the conditional sigmoids chained (a loop: ONNX has no cumprod)."""
        s = torch.sigmoid(self.logits(output))
        chain = [s[:, 0]]
        for j in range(1, self.out_features):
            chain.append(chain[-1] * s[:, j])
        return torch.stack(chain, dim=1)

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        """Predicted class index: the number of thresholds passed."""
        return (self._above(output) > 0.5).sum(dim=1)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        above = self._above(output)
        ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
        return torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)

    def decode_readout(self, readout: np.ndarray) -> list:
        above = np.asarray(readout)[:, ::-1].cumsum(axis=1)[:, ::-1][:, 1:]  # P(rank > j) = sum of p[j + 1:]
        return [self.labels[int(r)] for r in (above > 0.5).sum(axis=1)]

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if target.shape[0] == 0:
            return {}
        rank = self.predicted(output)
        return {
            "accuracy": (rank == target).float().mean().item(),
            "mae_bins": (rank - target).abs().float().mean().item(),
        }

    def per_row(self, output: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor | None:
        if metric == "mae_bins":
            return (self.predicted(output) - target.long()).abs().float()
        return super().per_row(output, target, metric)
