"""Model selection: which epoch is best by a monitored history column (or a weighted mix), and when to stop.

``monitor`` is ``None`` (the total loss), a history column or a short form of one (``"age/mae"``
means ``"val/age/mae"`` when there is validation data, ``"age"`` that head's loss), or a mapping
of such names to weights whose weighted sum is minimised (``{"age/mae": 0.1, "race/accuracy": -1}``).
With ``per_head=True`` the best weights by each head's primary metric are kept too.

    selector = Selector("age/mae", has_validation=True); selector.update(row, net)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from manyheads import columns
from manyheads.metrics import LOWER_IS_BETTER


def _better(score: float, best: float | None) -> bool:
    return not math.isnan(score) and (best is None or score < best)


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


class Selector:
    """Tracks the best epoch (lowest score; metrics where higher is better are negated)."""

    def __init__(
        self,
        monitor: str | Mapping[str, float] | None,
        has_validation: bool,
        *,
        heads: Mapping | None = None,
        per_head: bool = False,
    ) -> None:
        prefix = "val" if has_validation else "train"
        mix = {"total/loss": 1.0} if monitor is None else monitor
        mix = {mix: 1.0} if isinstance(mix, str) else dict(mix)
        self.weights = {}
        for name, weight in mix.items():
            column = columns.qualify(name, prefix)
            lower = column.rsplit("/", 1)[-1] in LOWER_IS_BETTER  # the metric part of split/head/metric
            # a single metric where higher is better is maximised; a mix is minimised as given
            self.weights[column] = float(weight) if (len(mix) > 1 or lower) else -float(weight)
        self.name = (
            next(iter(self.weights))
            if len(self.weights) == 1
            else " + ".join(f"{w:g}*{c}" for c, w in self.weights.items())
        )
        self.head_columns = {}
        if per_head and heads:
            for name, head in heads.items():
                self.head_columns[name] = (
                    columns.name(prefix, name, head.primary),
                    -1.0 if head.higher_is_better else 1.0,
                )
        self.score: float | None = None
        self.epoch: int | None = None
        self.state: dict | None = None
        self.head_best: dict[str, dict] = {}

    def update(self, row: Mapping, net: nn.Module) -> bool:
        """Record an epoch's history row; keep the net's weights if it is the best so far."""
        missing = [c for c in self.weights if c not in row]
        if missing:
            raise ValueError(f"monitor: no history column {missing}; columns are {sorted(row)}")
        score = sum(w * row[c] for c, w in self.weights.items())
        improved = _better(score, self.score)
        if improved:
            self.score, self.epoch, self.state = score, int(row["epoch"]), _snapshot(net)
        for head, (column, sign) in self.head_columns.items():
            value = sign * row.get(column, float("nan"))
            if _better(value, self.head_best.get(head, {}).get("score")):
                self.head_best[head] = {"score": value, "epoch": int(row["epoch"]), "state": _snapshot(net)}
        return improved

    def should_stop(self, epoch: int, patience: int | None) -> bool:
        """True once ``patience`` epochs have passed without improvement."""
        return patience is not None and self.epoch is not None and epoch - self.epoch > patience

    def state_dict(self) -> dict:
        return {"score": self.score, "epoch": self.epoch, "state": self.state, "heads": self.head_best}

    def load_state_dict(self, state: Mapping) -> None:
        self.score, self.epoch, self.state = state["score"], state["epoch"], state["state"]
        self.head_best = dict(state.get("heads", {}))
