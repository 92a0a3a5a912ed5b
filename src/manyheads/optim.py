"""Optimizer, learning-rate schedule and weight averaging.

Parameter groups split trunk and heads. The schedule is a plain function of the step inside
``LambdaLR``, so its whole state is one integer and a checkpoint restores it exactly. One-cycle
also cycles momentum (Adam's beta1 or SGD's momentum) inversely to the rate, 0.95 -> 0.85 -> 0.95,
as torch's ``OneCycleLR`` and fastai do: low momentum while the rate is high. ``WeightAverage``
keeps an exponential moving average of the weights, as Keras' ``use_ema`` and timm's ``ModelEma``.

    opt, trunk = build_optimizer(net, "adamw", lr=1e-3, trunk_lr=1e-4); sched = schedule(opt, "onecycle", 800)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = (None, "constant", "cosine", "onecycle")


def build_optimizer(
    net: nn.Module,
    name: Any = "adamw",
    *,
    lr: float = 1e-3,
    trunk_lr: float | None = None,
    weight_decay: float | None = None,
    extra: list[nn.Parameter] | None = None,
) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """An optimizer over the net (trunk at ``trunk_lr`` if given) plus ``extra`` parameters; and the trunk's."""
    cls = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else name
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; available: {sorted(OPTIMIZERS)} or a torch optimizer class")
    trunk = list(net.trunk.parameters()) if not getattr(net, "outputs_dict", True) else []
    in_trunk = {id(p) for p in trunk}
    groups = [{"params": [p for p in net.parameters() if id(p) not in in_trunk] + list(extra or [])}]
    if trunk:
        groups.append({"params": trunk, "lr": trunk_lr if trunk_lr is not None else lr})
    kwargs = {"lr": lr} if weight_decay is None else {"lr": lr, "weight_decay": weight_decay}
    return cls(groups, **kwargs), trunk


MOMENTUM = (0.85, 0.95)  # one-cycle's momentum at the peak rate and at both ends


def schedule_factor(kind: str | None, total_steps: int, warmup: float = 0.3) -> Callable[[int], float]:
    """Learning-rate factor per step: constant, cosine decay, or one-cycle (linear warm-up, then cosine)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if kind in (None, "constant"):
        return lambda step: 1.0
    warm = int(total_steps * warmup) if kind == "onecycle" else 0

    def factor(step: int) -> float:
        if step < warm:
            return 0.04 + 0.96 * step / warm  # one-cycle starts at lr / 25, as torch's OneCycleLR
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def momentum_at(kind: str | None, total_steps: int, warmup: float = 0.3) -> Callable[[int], float] | None:
    """One-cycle's momentum per step, falling as the rate rises and rising as it falls; None otherwise."""
    if kind != "onecycle":
        return None
    rate, warm = schedule_factor(kind, total_steps, warmup), int(total_steps * warmup)
    low, high = MOMENTUM

    def momentum(step: int) -> float:
        height = step / warm if step < warm else rate(step)  # 0 at the ends of the cycle, 1 at its peak
        return high - (high - low) * height

    return momentum


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` that also sets each group's momentum when the schedule cycles it."""

    def __init__(self, opt: torch.optim.Optimizer, factor: Callable[[int], float], momentum=None) -> None:
        self.momentum = momentum
        # Groups without momentum (SGD with momentum 0) are left alone: cycling would switch it on.
        self.cycled = [i for i, g in enumerate(opt.param_groups) if "betas" in g or g.get("momentum", 0) > 0]
        super().__init__(opt, factor)  # steps once, which sets the first step's momentum

    def step(self) -> None:
        super().step()
        if self.momentum is None:
            return
        value = self.momentum(self.last_epoch)
        for group in (self.optimizer.param_groups[i] for i in self.cycled):
            if "betas" in group:
                group["betas"] = (value, *group["betas"][1:])
            else:
                group["momentum"] = value

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        del state["momentum"], state["cycled"]  # rebuilt from the schedule's arguments, like lr_lambdas
        return state


def schedule(opt: torch.optim.Optimizer, kind: str | None, total_steps: int, warmup: float = 0.3) -> Schedule:
    """The scheduler, stepping once per training step."""
    return Schedule(opt, schedule_factor(kind, total_steps, warmup), momentum_at(kind, total_steps, warmup))


class WeightAverage(AveragedModel):
    """An exponential moving average of a net's weights and batch-norm statistics (``.module``).

    Update ``t`` keeps ``min(decay, (1 + t) / (10 + t))`` of the average, so early updates forget
    fast and a short run's average is not anchored to its first steps (TensorFlow's
    ``num_updates`` rule). The count is kept on the host: updating never waits for the GPU.

        average = WeightAverage(net, 0.999); ...; opt.step(); average.update_parameters(net)
    """

    def __init__(self, net: nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        super().__init__(net, multi_avg_fn=self._blend, use_buffers=True)
        self.decay, self.updates = decay, 0
        self.module.requires_grad_(False)

    @torch.no_grad()
    def _blend(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _: Any) -> None:
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - keep)
        else:  # integer buffers (batch-norm batch counts) are counts, not weights
            for a, c in zip(averaged, current):
                a.copy_(c)

    def update_parameters(self, model: nn.Module) -> None:
        super().update_parameters(model)
        self.updates += 1

    def load_state_dict(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        loaded = super().load_state_dict(state, *args, **kwargs)
        self.updates = int(self.n_averaged)
        return loaded
