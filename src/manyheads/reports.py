"""Reports: learning curves from a history, and (see evaluate_report) the evaluation report.

learning_curves(result.history, ["age", "gender"], "curves.png")
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: pd.DataFrame, heads: list[str], path: str | Path | None = None):
    """One column of plots per head: loss on top, its metrics below, train and validation."""
    plt = _pyplot()
    metric_names = {
        h: sorted({c.split("/")[2] for c in history.columns if c.count("/") == 2 and c.split("/")[1] == h}
                  - {"loss", "labels"})
        for h in heads
    }  # fmt: skip
    # balancing strategies change the weights per epoch: one more row shows them
    weighted = [h for h in heads if f"weight/{h}" in history and history[f"weight/{h}"].nunique() > 1]
    rows = 1 + max((len(m) for m in metric_names.values()), default=0) + bool(weighted)
    fig, axes = plt.subplots(rows, len(heads), figsize=(4 * len(heads), 2.8 * rows), squeeze=False)
    for col, head in enumerate(heads):
        for row, metric in enumerate(["loss", *metric_names[head]]):
            ax = axes[row][col]
            for split in ("train", "val"):
                column = f"{split}/{head}/{metric}"
                if column in history:
                    ax.plot(history["epoch"], history[column], marker="o", label=split)
            ax.set_title(f"{head} {metric}")
            ax.set_xlabel("epoch")
            ax.legend()
        for row in range(1 + len(metric_names[head]), rows - bool(weighted)):
            axes[row][col].axis("off")
        if head in weighted:
            ax = axes[rows - 1][col]
            ax.plot(history["epoch"], history[f"weight/{head}"], marker="o", color="tab:green")
            ax.set_title(f"{head} effective weight")
            ax.set_xlabel("epoch")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig
