"""Regression: one number per row (e.g. age in years), default loss ``"mse"``, judged by MAE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.calibration import INTERVALS, Conformal, check_coverage
from manyheads.heads.base import NOT_A_NUMBER, Head, _threshold, register, row_error


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
        self.conformal: Conformal | None = None  # fitted by calibrate(): the answer's interval
        self.coverage: float | None = None  # the interval's coverage now (set_coverage changes it)

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

    def readout(self, output: torch.Tensor) -> torch.Tensor:
        """The value [B]; with calibration, [B, 3]: value, interval low, interval high."""
        value = self.predicted(output)
        if self.conformal is None:
            return value
        low, high = self.interval(output)
        return torch.stack([value, low, high], dim=1)

    def decode_readout(self, readout: np.ndarray) -> list:
        readout = np.asarray(readout)
        return (readout[:, 0] if readout.ndim == 2 else readout.reshape(-1)).astype(float).tolist()

    def extras(self, readout: np.ndarray) -> dict[str, list]:
        readout = np.asarray(readout)
        if readout.ndim != 2:
            return {}
        extras: dict[str, list] = {"interval": readout[:, 1:3].astype(float).tolist()}
        if self.abstain is not None:
            extras["uncertain"] = (readout[:, 2] - readout[:, 1] > self.abstain).tolist()
        return extras

    # ---- calibration: split-conformal intervals --------------------------------------------

    def spread(self, output: torch.Tensor) -> torch.Tensor | None:
        """The head's own predicted spread per row (adaptive intervals scale with it); None: it has none."""
        return None

    def interval(self, output: torch.Tensor, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) per row at the current coverage; ``kind`` "plain" or "adaptive" (default: the fitted one)."""
        if self.conformal is None:
            raise ValueError("this head is not calibrated: calibrate it first (mh.calibrate or fit(calibration=...))")
        value, fitted = self.predicted(output), self.conformal
        plain, adaptive = fitted.half_widths(self.coverage)
        if (kind or fitted.interval) == "plain":
            half = torch.full_like(value, plain)
        elif fitted.method == "spread":
            half = adaptive[0] * self.spread(output)
        else:  # Mondrian: the group of the predicted value; comparisons and a gather, as ONNX has them
            edges = torch.tensor(fitted.edges, dtype=value.dtype, device=value.device)
            group = (value.unsqueeze(1) > edges.unsqueeze(0)).sum(dim=1)
            half = torch.tensor(adaptive, dtype=value.dtype, device=value.device)[group]
        low, high = value - half, value + half
        if self.min is not None or self.max is not None:  # true values lie within the bounds: no coverage lost
            low, high = low.clamp(self.min, self.max), high.clamp(self.min, self.max)
        return low, high

    def calibrate(self, output: torch.Tensor, target: torch.Tensor, **options: Any) -> dict[str, float]:
        """Fit plain and adaptive conformal intervals at ``coverage`` (default 0.9) on held-out rows."""
        coverage = check_coverage(options.get("coverage", 0.9))
        interval = options.get("interval", "adaptive")
        if interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
        output = output.detach().float().cpu()
        spread = self.spread(output)
        value = self.predicted(output).numpy()
        self.conformal = Conformal.fit(value, target.float().cpu().numpy(), None if spread is None else spread.numpy(),
                                       coverage, interval)  # fmt: skip
        self.set_coverage(coverage)
        self.abstain = _threshold(options.get("abstain"), "abstain (an interval width)", 0.0, float("inf"))
        plain, adaptive = self.conformal.half_widths()
        return {"coverage": coverage, "rows": len(value), "plain_half_width": plain}

    def set_coverage(self, coverage: float) -> None:
        if self.conformal is None:
            return
        coverage = check_coverage(coverage)
        plain, adaptive = self.conformal.half_widths(coverage)
        if not all(np.isfinite([plain, *adaptive])):
            fewest = min(s.n for s in (self.conformal.plain, *self.conformal.adaptive))
            needed = int(np.ceil(coverage / (1 - coverage)))
            raise ValueError(f"a {coverage:.1%} interval needs more calibration rows than the {fewest} it was fitted "
                             f"on (at least {needed}); choose a lower coverage")  # fmt: skip
        self.coverage = coverage

    def schema(self) -> dict:
        return {**super().schema(), **({"coverage": self.coverage} if self.conformal is not None else {})}

    def calibration_spec(self) -> dict | None:
        if self.conformal is None:
            return None
        spec = {**self.conformal.to_json(), "coverage": self.coverage}
        return spec if self.abstain is None else {**spec, "abstain": self.abstain}

    def load_calibration(self, data: Mapping) -> None:
        if not isinstance(data, Mapping):
            raise ValueError(f"calibration must be a mapping, got {type(data).__name__}")
        self.conformal = Conformal.from_json(data, "calibration")
        self.set_coverage(self.conformal.coverage)
        self.abstain = _threshold(data.get("abstain"), "calibration 'abstain'", 0.0, float("inf"))

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
