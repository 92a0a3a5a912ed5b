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


class EpochOutputs:
    """Each head's outputs, targets and labelled flags over one epoch's training batches.

    Buffers for ``rows`` rows are allocated at the first batch and filled in place: keeping one
    small tensor per step instead scatters long-lived blocks among the freed activations, and the
    heap grows (BENCHMARKS.md, training overhead: peak memory).

        seen = EpochOutputs(len(data)); seen.add(outputs, targets, labelled); out, target, labelled = seen["age"]
    """

    def __init__(self, rows: int) -> None:
        self.rows, self.filled = rows, 0
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def add(self, outputs: dict, targets: dict, labelled: dict) -> None:
        size = len(next(iter(labelled.values())))
        if not self.buffers:
            self.buffers = {
                name: tuple(torch.empty((self.rows, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in parts)
                for name, parts in ((n, (outputs[n].detach(), targets[n], labelled[n])) for n in labelled)
            }
        for name, buffers in self.buffers.items():
            for buffer, part in zip(buffers, (outputs[name].detach(), targets[name], labelled[name])):
                buffer[self.filled : self.filled + size] = part
        self.filled += size

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outputs, targets and labelled flags of the rows added so far."""
        return tuple(buffer[: self.filled] for buffer in self.buffers[name])

    def __bool__(self) -> bool:
        return self.filled > 0
