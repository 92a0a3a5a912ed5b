"""MultiLabel: k independent sigmoids (a set of labels per row), default loss ``"bce"``, judged by macro-F1."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from manyheads.heads.base import NOT_A_LABEL, register, row_error
from manyheads.heads.binary import Sigmoids


@register("multilabel")
class MultiLabel(Sigmoids):
    """k independent sigmoids; a target is a set/list of labels or a 0/1 vector. Default loss ``"bce"``.

    ``class_weights="balanced"`` weighs each label's positives by its negatives / positives.

        mh.MultiLabel(["glasses", "beard", "hat"])
    """

    default_loss = "bce"
    losses: ClassVar[frozenset[str]] = frozenset({"bce", "focal"})
    primary = "macro_f1"
    groups = False  # a row has several labels: they do not split rows into groups

    @property
    def out_features(self) -> int:
        return len(self.labels)

    @property
    def squeeze(self) -> bool:
        return False

    def _placeholder(self) -> Any:
        return np.zeros(len(self.labels), dtype=np.float32)

    def _target_shape(self) -> tuple[int, ...]:
        return (len(self.labels),)

    def _encode_one(self, value: Any, name: str, column: str, row: Any) -> np.ndarray:
        k = len(self.labels)
        if isinstance(value, str):
            value = [value]
        try:
            items = list(value.tolist() if isinstance(value, np.ndarray | torch.Tensor) else value)
        except TypeError:
            message = f"expected a list of labels of {self.labels!r}, got {value!r}"
            raise row_error(name, column, row, message, "label of the wrong type") from None
        is_vector = all(isinstance(v, bool | int | float | np.number) and v in (0, 1) for v in items)
        if is_vector and len(items) == k:  # a 0/1 indicator vector rather than a set of label names
            return np.asarray(items, dtype=np.float32)
        vector = np.zeros(k, dtype=np.float32)
        for item in items:
            if self._key(item) not in self._index:
                raise row_error(
                    name, column, row, f"{item!r} is not one of the head's labels {self.labels!r}", NOT_A_LABEL
                )
            vector[self._index[self._key(item)]] = 1
        return vector

    def row_weights(self, target: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor | None:
        return None  # its class weights are per-label positive weights, inside the loss

    def class_weight_vector(self, target: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor | None:
        if self.class_weights == "balanced":  # per-label positive weight: negatives / positives
            positives = target[labelled].sum(dim=0)
            return (labelled.sum() - positives) / positives.clamp(min=1)
        return super().class_weight_vector(target, labelled)

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(output))

    def nll(self, output: torch.Tensor, target: torch.Tensor) -> float:
        p = self.proba(output).clamp(1e-12, 1 - 1e-12)
        return float(-(target * p.log() + (1 - target) * (1 - p).log()).mean())

    def confident(self, readout: np.ndarray) -> np.ndarray:
        p = np.asarray(readout)
        return np.maximum(p, 1 - p).min(axis=1)  # the least sure of its yes/no answers

    def decode_readout(self, readout: np.ndarray) -> list:
        return [[label for label, on in zip(self.labels, row) if on] for row in (np.asarray(readout) > 0.5).tolist()]

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        if target.shape[0] == 0:
            return {}
        from torchmetrics.functional.classification import multilabel_f1_score  # takes seconds to import

        logits, target = self.canonical(output).float(), target.long()
        k = self.out_features
        return {
            "accuracy": (self.predicted(logits) == target).float().mean().item(),
            "macro_f1": multilabel_f1_score(torch.sigmoid(logits), target, num_labels=k, average="macro").item(),
        }
