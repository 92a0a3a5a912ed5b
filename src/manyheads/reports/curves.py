"""Learning curves: each head's loss and metrics per epoch, train and validation, from a history.

learning_curves(result.history, ["age", "gender"], "curves.png")
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from manyheads import columns
from manyheads.reports.plots import pyplot


def learning_curves(history: pd.DataFrame, heads: list[str], path: str | Path | None = None):
    """One column of plots per head: loss on top, its metrics below, train and validation."""
    plt = pyplot()
    metric_names = {
        h: sorted({parsed.metric for c in history.columns if (parsed := columns.parse(c)) and parsed.head == h}
                  - {"loss", "labels"})
        for h in heads
    }  # fmt: skip
    # balancing strategies change the weights per epoch: one more row shows them
    weighted = [h for h in heads if columns.weight(h) in history and history[columns.weight(h)].nunique() > 1]
    rows = 1 + max((len(m) for m in metric_names.values()), default=0) + bool(weighted)
    fig, axes = plt.subplots(rows, len(heads), figsize=(4 * len(heads), 2.8 * rows), squeeze=False)
    for col, head in enumerate(heads):
        for row, metric in enumerate(["loss", *metric_names[head]]):
            ax = axes[row][col]
            for split in ("train", "val"):
                column = columns.name(split, head, metric)
                if column in history:
                    ax.plot(history["epoch"], history[column], marker="o", label=split)
            ax.set_title(f"{head} {metric}")
            ax.set_xlabel("epoch")
            ax.legend()
        for row in range(1 + len(metric_names[head]), rows - bool(weighted)):
            axes[row][col].axis("off")
        if head in weighted:
            ax = axes[rows - 1][col]
            ax.plot(history["epoch"], history[columns.weight(head)], marker="o", color="tab:green")
            ax.set_title(f"{head} effective weight")
            ax.set_xlabel("epoch")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return fig
