"""Per-head metrics, computed once per epoch on the labelled rows (torchmetrics does the maths).

head_metrics(mh.Categorical(["a", "b", "c"]), logits, target)  # {"accuracy": ..., "macro_f1": ...}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from manyheads.heads import Head

# The metric each kind is judged by first, and whether higher is better (model selection, reports).
PRIMARY = {
    "regression": ("mae", False),
    "binary": ("accuracy", True),
    "categorical": ("accuracy", True),
    "ordinal": ("mae_bins", False),
    "multilabel": ("macro_f1", True),
}


# History metrics where lower is better (everything else, e.g. accuracy, is higher-better).
LOWER_IS_BETTER = ("loss", "mae", "rmse", "mae_bins")


def head_metrics(head: Head, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Metrics of one head on labelled rows: raw outputs against encoded targets."""
    if target.shape[0] == 0:
        return {}
    from torchmetrics.functional import classification as tmf  # imported here: it takes seconds to load

    output = head.canonical(output).float()
    kind = head.kind
    if kind == "regression":
        error = output - target.float()
        return {"mae": error.abs().mean().item(), "rmse": error.square().mean().sqrt().item()}
    if kind == "binary":
        target = target.long()
        both = target.min() != target.max()  # AUROC is undefined with one class present
        return {
            "accuracy": ((output > 0).long() == target).float().mean().item(),
            "auroc": tmf.binary_auroc(torch.sigmoid(output), target).item() if both else float("nan"),
        }
    if kind == "ordinal":
        rank = head.rank(output)
        return {
            "accuracy": (rank == target).float().mean().item(),
            "mae_bins": (rank - target).abs().float().mean().item(),
        }
    if kind == "categorical":
        k = head.out_features
        predicted = output.argmax(dim=1)
        return {
            "accuracy": (predicted == target).float().mean().item(),
            "macro_f1": tmf.multiclass_f1_score(predicted, target, num_classes=k, average="macro").item(),
        }
    if kind == "multilabel":
        k = head.out_features
        target = target.long()
        return {
            "accuracy": ((output > 0).long() == target).float().mean().item(),
            "macro_f1": tmf.multilabel_f1_score(torch.sigmoid(output), target, num_labels=k, average="macro").item(),
        }
    raise ValueError(f"no metrics for head kind {kind!r}")
