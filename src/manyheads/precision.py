"""Precision: how a training step runs its forward pass, backward pass and optimizer step.

``fp32`` runs as written; ``bf16`` and ``fp16`` run the forward pass under autocast. Under
``fp16`` on a GPU a grad scaler multiplies the loss before the backward pass (small gradients
would underflow in half precision), and its ``step`` unscales the gradients and skips a step
whose gradients overflowed.

    precision = Precision.create("bf16", device)
    with precision.autocast():
        loss = net(x).square().mean()
    precision.backward(loss); precision.step(optimizer)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One precision on one device: its autocast context, and the fp16 grad scaler where there is one."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device, self.dtype = name, torch.device(device), PRECISIONS[name]
        # torch's GradScaler exists for CUDA: fp16 on the CPU autocasts without one
        self.scaler = torch.amp.GradScaler("cuda") if name == "fp16" and self.device.type == "cuda" else None
        # built once: a step enters it every time, and building one per step costs more than entering it
        self._autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
        )

    @classmethod
    def create(cls, name: str, device: str | torch.device) -> Precision:
        """The precision called ``name`` (one of :data:`PRECISIONS`) on ``device``; a ValueError for others.

        precision = Precision.create("fp16", "cuda")
        """
        if name not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {name!r}")
        return cls(name, torch.device(device))

    def autocast(self) -> AbstractContextManager:
        """The context the forward pass and the loss run in (a no-op for fp32)."""
        return self._autocast

    @property
    def grad_scale(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a loss is multiplied by before its backward pass: the grad scaler's ``scale``, or None (no scaling).

        Balancers that take gradients themselves (GradNorm, the torchjd strategies) get it once, at creation.
        """
        return self.scaler.scale if self.scaler is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss``, scaled under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step the optimizer; under fp16 the scaler unscales first, skips an overflowing step and updates its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, {self.device}{', grad scaler' if self.scaler is not None else ''})"
