"""Categorical: k logits and a softmax, default loss ``"cross_entropy"``, judged by accuracy."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.heads.base import Classifier, register


@register("categorical")
class Categorical(Classifier):
    """k logits with a softmax. Default loss ``"cross_entropy"``; metrics accuracy and macro-F1.

    ``label_smoothing`` (also on Binary and MultiLabel) trains towards ``1 - e`` on the true class
    and spreads ``e`` over all classes, as torch's ``cross_entropy(label_smoothing=e)``.

        mh.Categorical(["White", "Black", "Asian", "Indian", "Others"], class_weights="balanced", label_smoothing=0.1)
    """

    default_loss = "cross_entropy"
    losses: ClassVar[frozenset[str]] = frozenset({"cross_entropy", "focal"})
    # Smoothed targets are [B, k] like multi-label ones, so the kind, not the shape, picks focal's softmax form.
    loss_variants: ClassVar[dict[str, str]] = {"focal": "focal_softmax"}
    primary = "accuracy"
    _target_dtype = torch.int64

    @property
    def out_features(self) -> int:
        return len(self.labels)

    def _encode_one(self, value: Any, name: str, column: str, row: Any) -> int:
        return self._class_index(value, name, column, row)

    def _prior(self, target: torch.Tensor) -> torch.Tensor:
        prior = torch.bincount(target.long(), minlength=len(self.labels)).float().clamp(min=1)
        return prior / prior.sum()

    def trivial_output(self, target: torch.Tensor) -> torch.Tensor:
        return self._prior(target).log().expand(len(target), -1).clone()

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        return self.canonical(output).argmax(dim=1)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(output), dim=1)

    def decode_readout(self, readout: np.ndarray) -> list:
        return [self.labels[int(i)] for i in np.asarray(readout).argmax(axis=1)]

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if target.shape[0] == 0:
            return {}
        from torchmetrics.functional.classification import multiclass_f1_score  # takes seconds to import

        predicted = self.predicted(output)
        k = self.out_features
        return {
            "accuracy": (predicted == target).float().mean().item(),
            "macro_f1": multiclass_f1_score(predicted, target, num_classes=k, average="macro").item(),
        }
