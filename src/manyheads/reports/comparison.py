"""The comparison report: joint against single-head models, as a summary, a cost table, a plot and every run.

write_comparison(mh.compare(net, df, epochs=5), "runs/compare")  # comparison.csv, .md and .png
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from manyheads.metrics import LOWER_IS_BETTER
from manyheads.reports import markdown
from manyheads.reports.plots import pyplot


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and spread over seeds) of joint, single and difference per head, metric and strategy.

    summarize(table)  # one row per head x metric x strategy
    """
    grouped = table.groupby(["head", "metric", "strategy"], sort=False)
    out = grouped.agg(
        seeds=("seed", "nunique"), single=("single", "mean"), joint=("joint", "mean"),
        difference=("difference", "mean"), difference_std=("difference", "std"),
        joint_better=("difference", lambda d: int((d > 0).sum())),
    ).reset_index()  # fmt: skip
    out["difference_std"] = out["difference_std"].fillna(0.0)
    return out


def _plot(summary: pd.DataFrame, path: Path) -> None:
    plt = pyplot()
    panels = list(dict.fromkeys(zip(summary["head"], summary["metric"])))
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns + 0.5, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (head, metric) in zip(axes.flat, panels):
        part = summary[(summary["head"] == head) & (summary["metric"] == metric)]
        labels = ["single"] + [f"joint\n{s}" for s in part["strategy"]]
        values = [part["single"].iloc[0]] + part["joint"].tolist()
        colors = ["#999999"] + ["#1f77b4"] * len(part)
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        better = "higher" if metric not in LOWER_IS_BETTER else "lower"
        ax.set_title(f"{head}: test {metric} ({better} is better)", fontsize=9)
    fig.suptitle("Joint vs single-head models (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(table: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``comparison.csv``, ``comparison.md`` and the bar plot ``comparison.png`` into ``out_dir``.

    write_comparison(mh.compare(net, df, epochs=5), "runs/compare")
    """
    if table.empty:
        raise ValueError("the comparison table is empty: nothing to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "comparison.csv", index=False)
    summary = summarize(table)
    _plot(summary, out / "comparison.png")
    first = table.drop_duplicates(["strategy", "seed"])
    cost = first.groupby("strategy", sort=False).agg(
        joint_params=("joint_params", "first"), singles_params=("singles_params", "first"),
        joint_seconds=("joint_seconds", "mean"), singles_seconds=("singles_seconds", "mean"),
    ).reset_index()  # fmt: skip
    text = [
        "# Does joint training help?",
        "",
        "Each head trained alone vs all heads trained jointly, same trunk, data split, epochs, batch size, "
        "learning rate and seeds, scored on the same held-out test split. **difference > 0 means the joint "
        "model is better** (lower error, or higher accuracy / F1 / AUROC); joint_better counts the seeds "
        "where it was.",
        "",
        "## Summary (mean over seeds)",
        "",
        markdown.frame(summary),
        "",
        "## Cost: one joint model vs all single-head models together",
        "",
        markdown.frame(cost),
        "",
        "![comparison](comparison.png)",
        "",
        "## Every run",
        "",
        markdown.frame(table[["head", "metric", "strategy", "seed", "joint", "single", "difference", "test_labels"]]),
        "",
    ]
    (out / "comparison.md").write_text("\n".join(text))
    return out
