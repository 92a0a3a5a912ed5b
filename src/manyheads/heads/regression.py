"""Regression: one number per row (e.g. age in years), default loss ``"mse"``, judged by MAE."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.heads.base import NOT_A_NUMBER, Head, register, row_error


@register("regression")
class Regression(Head):
    """A scalar output (e.g. age in years). Default loss ``"mse"``; metrics MAE and RMSE.

    With ``standardize=True`` (default) the head layer predicts in units of the training
    targets' spread and maps back, so a target in years trains as easily as one near 0, and its
    loss is computed on errors divided by that spread. ``min`` / ``max`` bound valid targets: a
    value outside is a bad row (an error, or skipped with ``on_bad="skip"``), e.g. a negative age.

        mh.Regression(min=0, max=120)
    """

    default_loss = "mse"
    losses: ClassVar[frozenset[str]] = frozenset({"mse", "mae", "huber"})
    primary = "mae"
    higher_is_better = False
    continuous = True
    readout_kind = "value"
    spec_fields: ClassVar[tuple[str, ...]] = ("standardize", "min", "max")

    def __init__(self, *, standardize: bool = True, min: float | None = None, max: float | None = None) -> None:
        for key, bound in (("min", min), ("max", max)):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float)):
                raise ValueError(f"Regression({key}=...) must be a number, got {bound!r}")
        if min is not None and max is not None and min > max:
            raise ValueError(f"Regression(min={min}, max={max}): min must not exceed max")
        if not isinstance(standardize, bool):
            raise ValueError(f"Regression(standardize=...) must be True or False, got {standardize!r}")
        self.standardize = standardize
        self.min, self.max = min, max

    @property
    def standardized(self) -> bool:
        return self.standardize

    def target_scale(self, values: torch.Tensor) -> tuple[float, float] | None:
        if not self.standardize or values.numel() < 2:
            return None
        return float(values.mean()), float(values.std().clamp(min=1e-6))

    def _encode_one(self, value: Any, name: str, column: str, row: Any) -> float:
        message = f"regression target must be a number, got {value!r}"
        if isinstance(value, bool | np.bool_ | str):
            raise row_error(name, column, row, message, NOT_A_NUMBER)
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise row_error(name, column, row, message, NOT_A_NUMBER) from None
        if not math.isfinite(number):
            raise row_error(name, column, row, f"regression target must be finite, got {value!r}", "label not finite")
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            bounds = f"[{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"
            raise row_error(name, column, row, f"{value!r} is outside {bounds}", f"label outside {bounds}")
        return number

    def loss_inputs(self, output, target, loss, scale=1.0):
        # Errors in units of the targets' spread: an age error in years does not swamp a cross-entropy.
        output = self.canonical(output).float()
        return output / scale, target / scale

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        return torch.full_like(target, float(target.mean()))

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        return self.canonical(output).float()

    def decode_readout(self, readout: np.ndarray) -> list:
        return np.asarray(readout).reshape(-1).astype(float).tolist()

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if target.shape[0] == 0:
            return {}
        error = self.predicted(output) - target.float()
        return {"mae": error.abs().mean().item(), "rmse": error.square().mean().sqrt().item()}

    def per_row(self, output: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor | None:
        return (self.predicted(output) - target.float()).abs() if metric == "mae" else None

    def spec(self) -> dict:
        bounds = {key: value for key, value in (("min", self.min), ("max", self.max)) if value is not None}
        return {**super().spec(), "standardize": self.standardize, **bounds}

    def __repr__(self) -> str:
        args = [] if self.standardize else ["standardize=False"]
        args += [f"{key}={value!r}" for key, value in (("min", self.min), ("max", self.max)) if value is not None]
        return f"Regression({', '.join(args)})"
