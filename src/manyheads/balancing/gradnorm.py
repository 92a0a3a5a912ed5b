"""GradNorm: learn weights that give every head a gradient norm matched to its training rate.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018. With ``G_h = || grad_W (w_h L_h) ||``,
``Gbar`` its mean over heads and ``r_h = (L_h / L_h(0)) / mean_j(L_j / L_j(0))``, the weights
descend ``sum_h | G_h - Gbar * r_h ** alpha |`` (the target is held constant), ``alpha = 1.5``,
and are renormalised to sum to ``K`` heads after each step.

The paper takes ``W`` as the last shared layer and allows cheaper choices; we take the gradient
with respect to the shared features themselves (the trunk's output [B, D]), which costs one
backward pass through the head layers per head and none through the trunk.

    mh.fit(net, df, weights="gradnorm")
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from manyheads.balancing.base import Balancer, Scale, needs_features_error
from manyheads.losses import ResolvedLosses

MIN_WEIGHT = 1e-3  # keeps weights positive whatever step the optimizer took


class GradNorm(Balancer):
    """GradNorm (Chen et al. 2018) on the shared features' gradient; weights > 0 summing to K."""

    name = "gradnorm"
    needs_features = True

    def __init__(
        self,
        losses: ResolvedLosses,
        normalizers: Mapping[str, float] | None = None,
        alpha: float = 1.5,
        *,
        scale: Scale = None,
    ) -> None:
        super().__init__(losses, normalizers, scale=scale)
        self.alpha = alpha
        self.task_weights = nn.Parameter(torch.ones(len(self.heads)))  # stepped by the loop's optimizer
        self.register_buffer("initial", torch.zeros(len(self.heads)))  # L_h(0), per head once it has labels

    @torch.no_grad()
    def _renormalize(self) -> torch.Tensor:
        w = self.task_weights
        w.clamp_(min=MIN_WEIGHT)
        w.mul_(len(self.heads) / w.sum())
        return w.detach().clone()

    def weights(self) -> dict[str, float]:
        w = self.task_weights.detach().clamp(min=MIN_WEIGHT)
        w = (len(self.heads) * w / w.sum()).tolist()
        return {name: self.base[name] * value for name, value in zip(self.heads, w)}

    def backward(self, losses: Mapping[str, torch.Tensor], features: torch.Tensor | None = None) -> None:
        if features is None:
            raise needs_features_error(self.name)
        w = self._renormalize()
        based = self.based(losses)
        values = torch.stack([loss.detach().float() for loss in based])
        if features.requires_grad:  # a frozen trunk leaves no shared gradient: weights stay as they are
            self._weights_gradient(based, values, features)
        self.backprop(sum(wh * loss for wh, loss in zip(w, based)))

    def _weights_gradient(self, based, values, features) -> None:
        """Set ``task_weights.grad`` to the gradient of GradNorm's loss (no graph through the net)."""
        # A head without labels in the batch has loss exactly 0: it takes no part this step.
        present = values > 0
        self.initial.copy_(torch.where((self.initial > 0) | ~present, self.initial, values))
        # Under fp16 the scaled loss keeps small feature gradients from underflowing; divided out after.
        factor = self.scale(torch.ones((), device=features.device)) if self.scale is not None else None
        norms = []
        for loss in based:
            grad = None
            if loss.requires_grad:  # not for a head weighted 0
                scaled = loss * factor if factor is not None else loss
                (grad,) = torch.autograd.grad(scaled, features, retain_graph=True, allow_unused=True)
            norms.append(grad.float().norm() if grad is not None else features.new_zeros((), dtype=torch.float32))
        norms = torch.stack(norms) / (factor if factor is not None else 1.0)
        present = present & (norms > 0)
        mask = present.float()
        count = mask.sum().clamp(min=1)
        grad_norms = self.task_weights * norms  # G_h = w_h ||dL_h/dfeatures||, differentiable in w
        mean_norm = (grad_norms.detach() * mask).sum() / count
        rate = torch.where(present, values / self.initial.clamp(min=1e-12), torch.zeros_like(values))
        relative = rate / ((rate * mask).sum() / count).clamp(min=1e-12)
        target = mean_norm * relative**self.alpha
        objective = ((grad_norms - target).abs() * mask).sum()
        (grad,) = torch.autograd.grad(objective, self.task_weights)
        if factor is not None:  # the grad scaler unscales every gradient in the optimizer
            grad = grad * factor
        self.task_weights.grad = grad
