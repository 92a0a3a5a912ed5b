"""TrainResult: what :func:`manyheads.fit` returns: the best net, the history, the resolved losses.

result = mh.fit(net, df); result.history.tail(); result.plot("curves.png")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from manyheads.losses import ResolvedLosses
from manyheads.net import MultiHeadNet


@dataclass
class TrainResult:
    """The net at its best epoch, one history row per epoch, and each head's loss and weight."""

    net: MultiHeadNet
    history: pd.DataFrame
    losses: ResolvedLosses
    best_epoch: int | None = None
    monitor: str = "val/total/loss"
    skipped: list[dict] = field(default_factory=list)
    seed: int | None = None

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
        summary = {
            "best_epoch": self.best_epoch,
            "monitor": self.monitor,
            "seed": self.seed,
            "losses": {name: loss.describe() for name, loss in self.losses.items()},
            "skipped": self.skipped,
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
