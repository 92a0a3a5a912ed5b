"""The constant-weight balancer, and the interface every balancing strategy follows.

A balancer turns the heads' losses into one objective (or does the backward pass itself, for
gradient methods); it never owns the training loop. :func:`manyheads.fit` calls it so:

    balancer = create(weights, losses, normalizers, scale=precision.grad_scale)  # parameters() join the optimizer
    balancer.start_epoch(epoch, past_train_losses)     # each epoch
    balancer.backward(head_losses, features)           # each step; features only if needs_features
    balancer.weights()                                 # history columns weight/<head>

``scale`` is the fp16 grad scaler's ``scale`` (``Precision.grad_scale``), or None: it is fixed for
the whole run, so a balancer takes it once, at creation, and every backward pass applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from manyheads.losses import ResolvedLosses

Scale = Callable[[torch.Tensor], torch.Tensor] | None  # an fp16 GradScaler's ``scale``, or None


class Balancer(nn.Module):
    """Constant weights: the objective is the weighted sum of the heads' losses.

    Every strategy starts from the same per-head loss ``base_h * L_h / n_h``: ``base_h`` is the
    head's constant weight from loss resolution (``loss.weight``; all 1 when ``weights=`` names a
    strategy) and ``n_h`` the trivial predictor's loss when ``normalize=True`` (else 1).

        balancer = Balancer(resolve(heads, weights={"age": 0.1}))
    """

    name = "constant"
    needs_features = False  # True: the loop passes the trunk's shared features [B, D] to backward

    def __init__(
        self, losses: ResolvedLosses, normalizers: Mapping[str, float] | None = None, *, scale: Scale = None
    ) -> None:
        super().__init__()
        self.scale = scale  # the fp16 grad scaler's scale, applied to every backward pass; None: unscaled
        self.heads = list(losses)
        self.base = {name: loss.weight for name, loss in losses.items()}
        # Loss of a trivial predictor per head: dividing by it starts every head near 1.
        self.normalizers = dict(normalizers or {})

    def scaled(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss divided by its normaliser (unchanged without ``normalize=True``)."""
        if not self.normalizers:
            return dict(losses)
        return {name: loss / self.normalizers.get(name, 1.0) for name, loss in losses.items()}

    def based(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """``base_h * L_h / n_h`` per head, in head order: what strategies weight further."""
        losses = self.scaled(losses)
        based = []
        for name in self.heads:
            weight, loss = self.base[name], losses[name]
            # Weight 0 leaves the head out (a constant 0): its layer gets no gradient and no weight decay.
            # Weight 1 skips the multiplication: a step's small ops add up on the CPU.
            based.append(loss.detach() * 0 if weight == 0 else loss if weight == 1 else weight * loss)
        return based

    def weights(self) -> dict[str, float]:
        """The effective weight of each head now (for history and progress)."""
        return dict(self.base)

    def start_epoch(self, epoch: int, train_losses: list[dict[str, float]]) -> None:
        """Called before each epoch with the per-head mean train losses of past epochs."""

    def objective(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        based = self.based(losses)
        return sum(based[1:], based[0])  # not sum(based): that adds a 0 first, one more op and its backward

    def backward(self, losses: Mapping[str, torch.Tensor], features: torch.Tensor | None = None) -> None:
        """Back-propagate the objective (multiplied by ``self.scale`` under fp16)."""
        total = self.objective(losses)
        if isinstance(total, torch.Tensor):
            self.backprop(total)

    def backprop(self, total: torch.Tensor) -> None:
        """``total.backward()``, the loss multiplied by ``self.scale`` under fp16; nothing when no head takes part."""
        if total.requires_grad:  # else every head is weighted 0
            (self.scale(total) if self.scale else total).backward()

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


def average_over_ranks(tensor: torch.Tensor) -> None:
    """Average a tensor in place over torchrun's processes (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())


def needs_features_error(name: str) -> ValueError:
    return ValueError(
        f"weights={name!r} needs the trunk's shared features, which the training loop only has for a "
        "MultiHeadNet whose trunk returns features, in a single process. Under torchrun (world > 1) or "
        "with an outputs_dict module use weights='constant', 'uncertainty' or 'dwa' instead."
    )
