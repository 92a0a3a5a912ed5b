"""Binary: one logit and a sigmoid, default loss ``"bce"``, judged by accuracy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.heads.base import Classifier, register


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class Sigmoids(Classifier):
    """Shared code of heads that answer with independent sigmoids (binary, multi-label)."""

    def smooth(self, target: torch.Tensor, classes: int) -> torch.Tensor:
        """Each 0/1 target moved ``label_smoothing`` towards 1/2."""
        e = self.label_smoothing
        return target * (1 - e) + e / 2 if e else target

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        return _logit(target.float().mean(dim=0)).expand_as(target).clone()  # each sigmoid's base rate

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        return (self.canonical(output) > 0).long()


@register("binary")
class Binary(Sigmoids):
    """One logit with a sigmoid. Default loss ``"bce"``; metrics accuracy and AUROC.

    Targets may be 0/1, booleans or one of two ``labels`` (the second label is class 1).

        mh.Binary(["male", "female"])
    """

    default_loss = "bce"
    losses: ClassVar[frozenset[str]] = frozenset({"bce", "focal"})
    primary = "accuracy"

    def __init__(
        self,
        labels: Sequence | None = None,
        *,
        class_weights: str | Mapping | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__([0, 1] if labels is None else labels, class_weights, label_smoothing=label_smoothing)
        if len(self.labels) != 2:
            raise ValueError(f"Binary takes exactly 2 labels, got {self.labels!r}")
        self._named = labels is not None

    @classmethod
    def from_spec(cls, fields: Mapping) -> Binary:
        return cls(**fields)  # labels are optional: 0/1

    @classmethod
    def example(cls) -> Binary:
        return cls(["no", "yes"])

    def _encode_one(self, value: Any, name: str, column: str, row: Any) -> float:
        return float(self._class_index(value, name, column, row))

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.logits(output))
        return torch.stack([1 - p, p], dim=1)

    def decode_readout(self, readout: np.ndarray) -> list:
        positive = (np.asarray(readout)[:, 1] > 0.5).tolist()
        return [self.labels[int(p)] for p in positive] if self._named else [bool(p) for p in positive]

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if target.shape[0] == 0:
            return {}
        from torchmetrics.functional.classification import binary_auroc  # takes seconds to import

        logits, target = self.canonical(output).float(), target.long()
        both = target.min() != target.max()  # AUROC is undefined with one class present
        return {
            "accuracy": (self.predicted(logits) == target).float().mean().item(),
            "auroc": binary_auroc(torch.sigmoid(logits), target).item() if both else float("nan"),
        }

    def spec(self) -> dict:
        spec = super().spec()
        if not self._named:
            del spec["labels"]
        return spec

    def __repr__(self) -> str:
        return f"Binary({self.labels!r})" if self._named else "Binary()"
