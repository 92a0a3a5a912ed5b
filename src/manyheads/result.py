"""TrainResult: what :func:`manyheads.fit` returns: the best net, the history, the resolved losses.

result = mh.fit(net, df); result.history.tail(); result.plot("curves.png")
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from manyheads.losses import ResolvedLosses
from manyheads.net import MultiHeadNet
from manyheads.rows import BadRow


@dataclass
class TrainResult:
    """The net at its best epoch, one history row per epoch, and each head's loss and weight."""

    net: MultiHeadNet
    history: pd.DataFrame
    losses: ResolvedLosses
    best_epoch: int | None = None
    monitor: str = "val/total/loss"
    skipped: list[BadRow] = field(default_factory=list)  # rows on_bad='skip' left out
    seed: int | None = None
    # head -> {"epoch", "state"}, and where fit calibrated {"calibration", "net"}: that net calibrated on its weights
    best_per_head: dict[str, dict] = field(default_factory=dict)
    calibration: dict[str, dict] = field(default_factory=dict)  # head -> what calibrate() fitted ({}: none)

    def net_for(self, head: str) -> MultiHeadNet:
        """A copy of the net at the best epoch for ``head`` (``fit(..., keep_best_per_head=True)``).

        Where fit calibrated, the copy is calibrated on its own weights (``best_per_head[head]["calibration"]``).

            age_net = result.net_for("age")
        """
        if head not in self.best_per_head:
            raise ValueError(f"no best weights kept for head {head!r}; pass keep_best_per_head=True to fit")
        best = self.best_per_head[head]
        if "net" in best:
            return copy.deepcopy(best["net"]).eval()
        net = copy.deepcopy(self.net)
        net.load_state_dict(best["state"])
        return net.eval()

    def plot(self, path: str | Path | None = None):
        """Per-head learning curves (loss and metrics, train and validation); saved if ``path``."""
        from manyheads.reports import learning_curves

        return learning_curves(self.history, list(self.net.heads), path)

    def write(self, run_dir: str | Path) -> Path:
        """Write model, history, curves, losses and skipped rows into ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.net.save(run_dir / "model.safetensors")
        self.history.to_csv(run_dir / "history.csv", index=False)
        self.plot(run_dir / "learning_curves.png")
        for head in self.best_per_head:
            self.net_for(head).save(run_dir / f"best_{head}.safetensors")
        summary = {
            "best_epoch": self.best_epoch,
            "monitor": self.monitor,
            "seed": self.seed,
            "losses": {name: loss.describe() for name, loss in self.losses.items()},
            "skipped": [row.as_dict() for row in self.skipped],
            "best_epoch_per_head": {head: best["epoch"] for head, best in self.best_per_head.items()},
            "calibration_per_head": {
                h: best["calibration"] for h, best in self.best_per_head.items() if "calibration" in best
            },
            "calibration": self.calibration,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return run_dir

    def __repr__(self) -> str:
        last = self.history.iloc[-1] if len(self.history) else {}
        metrics = ", ".join(
            f"{k}={last[k]:.4g}" for k in self.history.columns if k.startswith("val/") and not k.endswith("/labels")
        )
        return (
            f"TrainResult(epochs={len(self.history)}, best_epoch={self.best_epoch}, {metrics or 'no validation'})\n"
            f"losses:\n{self.losses!r}"
        )
