"""Distribution: a number answered from a distribution over evenly spaced values (e.g. ages 0-100).

The usual winner in age estimation (DLDL-v2, Gao et al. 2018; mean-variance, Pan et al. 2018):
a softmax over bins, answered as its mean (or median), with quantiles for an interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.heads.base import register
from manyheads.heads.regression import Regression

ANSWERS = ("mean", "median")


@register("distribution")
class Distribution(Regression):
    """A scalar predicted as a distribution over ``min, min + step, ..., max``. Default loss ``"dldl"``.

    Targets are numbers within ``[min, max]`` (outside: a bad row). ``predict`` answers the
    distribution's mean (``answer="mean"``) or median in target units, ``predict_proba`` the
    distribution itself, and :meth:`quantile` any quantile (an interval for free). Losses:
    ``"dldl"`` (KL from a Gaussian of spread ``sigma`` around the label, plus the L1 error of the
    mean), ``"mean_variance"``, or ``"cross_entropy"`` on the label's nearest bin.

        mh.Distribution(min=0, max=100)  # ages in years, one bin per year
    """

    default_loss = "dldl"
    losses: ClassVar[frozenset[str]] = frozenset({"dldl", "mean_variance", "cross_entropy"})
    spec_fields: ClassVar[tuple[str, ...]] = ("min", "max", "step", "sigma", "answer")

    def __init__(
        self, *, min: float = 0.0, max: float = 100.0, step: float = 1.0, sigma: float = 2.0, answer: str = "mean"
    ) -> None:
        for key, value in (("min", min), ("max", max), ("step", step), ("sigma", sigma)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
                raise ValueError(f"Distribution({key}=...) must be a finite number, got {value!r}")
        if step <= 0 or sigma <= 0:
            raise ValueError(f"Distribution(step={step}, sigma={sigma}): both must be > 0")
        bins = (max - min) / step
        if not bins >= 1 or abs(bins - round(bins)) > 1e-6 or bins > 10_000:
            raise ValueError(f"Distribution(min={min}, max={max}, step={step}): (max - min) / step must be a whole "
                             f"number of steps from 1 to 10000")  # fmt: skip
        if answer not in ANSWERS:
            raise ValueError(f"Distribution(answer=...) must be one of {ANSWERS}, got {answer!r}")
        super().__init__(standardize=False, min=min, max=max)
        self.step, self.sigma, self.answer = float(step), float(sigma), answer
        self.bins = int(round(bins)) + 1

    @classmethod
    def from_spec(cls, fields: Mapping) -> Distribution:
        return cls(**fields)

    @property
    def out_features(self) -> int:
        return self.bins

    @property
    def squeeze(self) -> bool:
        return False

    def target_scale(self, values: torch.Tensor) -> tuple[float, float] | None:
        return None

    def values(self, device: torch.device | None = None) -> torch.Tensor:
        """The value of each bin, in target units."""
        return self.min + self.step * torch.arange(self.bins, device=device, dtype=torch.float32)

    # ---- losses --------------------------------------------------------------------------

    def loss_inputs(self, output, target, loss, scale=1.0):
        logits, position = self.canonical(output).float(), (target.float() - self.min) / self.step
        return logits, position.round().long() if loss == "cross_entropy" else position

    def loss_options(self, loss: str) -> dict[str, Any]:
        return {"sigma": self.sigma / self.step} if loss == "dldl" else {}

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        position = ((target.float() - self.min) / self.step).round().long().clamp(0, self.bins - 1)
        prior = torch.bincount(position, minlength=self.bins).float() + 0.5  # every bin keeps some mass
        return (prior / prior.sum()).log().expand(len(target), -1).clone()

    # ---- answers -------------------------------------------------------------------------

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.canonical(output).float(), dim=1)

    def quantile(self, output: torch.Tensor, q: float) -> torch.Tensor:
        """The ``q`` quantile per row, each bin's mass spread evenly over its width (in target units)."""
        p = self.proba(output)
        cdf = torch.cumsum(p, dim=1)
        k = (cdf < q).sum(dim=1, keepdim=True).clamp(max=self.bins - 1)  # the bin the quantile falls in
        before = torch.gather(cdf, 1, k) - torch.gather(p, 1, k)
        inside = (q - before) / torch.gather(p, 1, k).clamp_min(1e-12)
        position = k.squeeze(1).float() - 0.5 + inside.squeeze(1).clamp(0, 1)
        return self.min + self.step * position.clamp(0, self.bins - 1)

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        if self.answer == "median":
            return self.quantile(output, 0.5)
        return (self.proba(output) * self.values(output.device)).sum(dim=1)

    def spread(self, output: torch.Tensor) -> torch.Tensor:
        """The distribution's standard deviation per row (at least half a step): adaptive intervals scale with it."""
        p, values = self.proba(output), self.values(output.device)
        mean = (p * values).sum(dim=1, keepdim=True)
        return (p * (values - mean).square()).sum(dim=1).sqrt().clamp_min(self.step / 2)

    def spec(self) -> dict:
        return {"kind": self.kind, "min": self.min, "max": self.max, "step": self.step, "sigma": self.sigma,
                "answer": self.answer}  # fmt: skip

    def __repr__(self) -> str:
        return f"Distribution(min={self.min!r}, max={self.max!r}, step={self.step!r})"
