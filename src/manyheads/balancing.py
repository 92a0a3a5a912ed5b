"""Balancing: how the heads' losses combine into one objective.

A balancer returns the objective (or does the backward pass for gradient methods); it never
owns the training loop. ``weights=`` in :func:`manyheads.fit` takes constants per head or a
strategy name.

    balancer = create({"age": 0.1}, losses)          # constant weights
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from manyheads.losses import ResolvedLosses


class Balancer(nn.Module):
    """Constant weights: the objective is the weighted sum of the heads' losses."""

    name = "constant"
    needs_features = False  # gradient methods aggregate on the trunk's shared features

    def __init__(self, losses: ResolvedLosses, normalizers: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.heads = list(losses)
        self.base = {name: loss.weight for name, loss in losses.items()}
        # Loss of a trivial predictor per head: dividing by it starts every head near 1.
        self.normalizers = dict(normalizers or {})

    def scaled(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.normalizers:
            return dict(losses)
        return {name: loss / self.normalizers.get(name, 1.0) for name, loss in losses.items()}

    def weights(self) -> dict[str, float]:
        """The effective weight of each head now (for history and progress)."""
        return dict(self.base)

    def start_epoch(self, epoch: int, train_losses: list[dict[str, float]]) -> None:
        """Called before each epoch with the per-head mean train losses of past epochs."""

    def objective(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        losses = self.scaled(losses)
        # A head weighted 0 is left out, so its layer gets no gradient (and no weight decay).
        return sum(self.base[name] * losses[name] for name in self.heads if self.base[name] != 0)

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        features: torch.Tensor | None = None,
        scale=None,
    ) -> None:
        """Back-propagate the objective; ``scale`` is an fp16 grad scaler's ``scale`` or None."""
        total = self.objective(losses)
        (scale(total) if scale else total).backward()


STRATEGIES: dict[str, type[Balancer]] = {"constant": Balancer}


def create(
    weights: Mapping[str, float] | str | None,
    losses: ResolvedLosses,
    normalizers: Mapping[str, float] | None = None,
) -> Balancer:
    """A balancer for ``weights``: constants (already in ``losses``) or a strategy name."""
    if weights is None or isinstance(weights, Mapping):
        return Balancer(losses, normalizers)
    key = weights.lower()
    if key not in STRATEGIES:
        raise ValueError(f"unknown balancing strategy {weights!r}; available: {sorted(STRATEGIES)}")
    return STRATEGIES[key](losses, normalizers)
