"""The evaluation report: per-head metrics on a held-out table, error and confusion plots, fairness by group.

Writes ``report.md`` (readable on its own), ``metrics.json`` and PNGs into a folder: per-head
metrics, each head's primary metric with a 95 % bootstrap interval (how far it could move on
another test set of this size); for regression heads the error by range of the true value and
predicted against true; for classifiers the confusion matrix; and for every classifier's groups
(true labels, e.g. each race) every head's primary metric within that group, with the gap
between the best and the worst group.

    report = evaluate_report(net, test_df, "runs/faces")  # report["heads"]["age"]["metrics"]["mae"]
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manyheads import encoding
from manyheads.heads import Head
from manyheads.inference import encode_for, raw_outputs
from manyheads.reports import markdown as md
from manyheads.reports.groups import slug, value_ranges
from manyheads.reports.plots import pyplot
from manyheads.reports.robustness import robustness_lines, robustness_section
from manyheads.reports.trust import trust_lines, trust_section
from manyheads.robustness import shift_names

LEVEL, RESAMPLES = 0.95, 1000  # bootstrap intervals: coverage and number of resamples (seeded)
METRIC_ORDER = ("mae", "rmse", "mae_bins", "accuracy", "auroc", "macro_f1")


def _interval(head: Head, output: torch.Tensor, target: torch.Tensor, metric: str) -> dict[str, Any] | None:
    """Percentile bootstrap interval of ``metric``: the labelled rows resampled with replacement, seeded."""
    n = target.shape[0]
    if n < 2:
        return None
    gen = torch.Generator().manual_seed(0)
    per_row = head.per_row(output, target, metric)
    values = []
    chunk = max(1, min(RESAMPLES, 2**23 // n))  # at most ~8 M indices at a time
    for start in range(0, RESAMPLES, chunk):
        rows = torch.randint(n, (min(chunk, RESAMPLES - start), n), generator=gen)
        if per_row is not None:
            values.append(per_row[rows].mean(dim=1))
        else:  # metrics that are not means over rows (AUROC, F1, RMSE): computed on each resample
            values.append(torch.tensor([head.metrics(output[r], target[r]).get(metric, math.nan) for r in rows]))
    values = torch.cat(values).double()
    values = values[torch.isfinite(values)]
    if values.numel() < RESAMPLES // 2:
        return None
    low, high = torch.quantile(values, torch.tensor([(1 - LEVEL) / 2, (1 + LEVEL) / 2], dtype=torch.double))
    return {"metric": metric, "level": LEVEL, "low": float(low), "high": float(high), "resamples": RESAMPLES}


def _by_range(true: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """MAE and mean signed error per range of the true value (decades for ages)."""
    rows = []
    for label, low, high, members in value_ranges(true):
        error = predicted[members] - true[members]
        rows.append({"range": label, "low": low, "high": high, "rows": int(error.size),
                     "mae": float(np.abs(error).mean()), "bias": float(error.mean())})  # fmt: skip
    return rows


def _group_table(heads: dict[str, Head], group: str, raw, encoded: encoding.Encoded) -> dict[str, Any]:
    """Each head's primary metric within each group of ``group``'s true labels, and best/worst gaps."""
    g_head = heads[group]
    g_target = encoded.targets[group].long()
    rows = []
    for index, label in enumerate(g_head.labels):
        members = encoded.labelled[group] & (g_target == index)
        row = {"group": label, "rows": int(members.sum()), "metrics": {}, "labelled": {}}
        for name, head in heads.items():
            keep = members & encoded.labelled[name]
            value = head.metrics(raw[name][keep], encoded.targets[name][keep]).get(head.primary) if keep.any() else None
            row["metrics"][name] = value
            row["labelled"][name] = int(keep.sum())
        rows.append(row)
    gaps = {}
    for name, head in heads.items():
        metric, higher = head.primary, head.higher_is_better
        values = [(r["metrics"][name], r["group"]) for r in rows if r["metrics"][name] is not None]
        values = [(v, g) for v, g in values if math.isfinite(v)]
        if len(values) >= 2:
            best = max(values) if higher else min(values)
            worst = min(values) if higher else max(values)
            gaps[name] = {"metric": metric, "gap": abs(best[0] - worst[0]), "best": best[1], "worst": worst[1]}
    return {"groups": rows, "gaps": gaps}


def evaluate_report(
    net,
    table_or_df: Any,
    out_dir: str | Path,
    *,
    inputs: str | None = "image",
    title: str = "Evaluation report",
    note: str | None = None,
    batch_size: int = 256,
    robustness: bool | str | Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``net`` on a labelled table and write report.md, metrics.json and plots into ``out_dir``.

    Metrics use the rows labelled for each head; unreadable images or invalid labels are skipped
    and listed. Returns what metrics.json holds (NaN as None). ``robustness`` (True, or shift names as
    "zoom_out,jpeg30") adds each head's primary metric on shifted photos: one more inference pass per shift.

        report = evaluate_report(result.net, test_df, "runs/faces"); report["fairness"]["race"]
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    heads = dict(net.heads)
    shifts = shift_names(robustness) if robustness else []  # a misspelt shift fails before any work
    encoded = encode_for(net, table_or_df, inputs=inputs, on_bad="skip")
    if len(encoded) == 0:
        raise ValueError(f"no usable rows to evaluate: all {len(encoded.bad)} were skipped, "
                         f"e.g. {encoded.bad[0].message if encoded.bad else '?'}")  # fmt: skip
    raw = {name: out.cpu() for name, out in raw_outputs(net, encoded, batch_size=batch_size).items()}
    skipped = [row.as_dict() for row in encoded.bad]
    report: dict[str, Any] = {"title": title, "note": note, "rows": len(encoded), "skipped": skipped,
                              "heads": {}, "by_range": {}, "confusion": {}, "fairness": {}}  # fmt: skip
    for name, head in heads.items():
        keep = encoded.labelled[name]
        metric, higher = head.primary, head.higher_is_better
        entry = {"kind": head.kind, "labelled": int(keep.sum()), "primary": metric, "higher_is_better": higher}
        entry["metrics"] = head.metrics(raw[name][keep], encoded.targets[name][keep]) if keep.any() else {}
        report["heads"][name] = entry
        if not keep.any():
            continue
        entry["interval"] = _interval(head, raw[name][keep], encoded.targets[name][keep], metric)
        if head.continuous:
            true = encoded.targets[name][keep].numpy().astype(float)
            predicted = head.predicted(raw[name][keep]).numpy().astype(float)
            report["by_range"][name] = _by_range(true, predicted)
            _plot_regression(name, true, predicted, report["by_range"][name], out / f"{_slug(name)}_errors.png")
        elif head.groups:
            k = len(head.labels)
            pairs = encoded.targets[name][keep].long() * k + head.predicted(raw[name][keep])
            counts = torch.bincount(pairs, minlength=k * k).reshape(k, k).tolist()
            report["confusion"][name] = {"labels": list(head.labels), "counts": counts}
            _plot_confusion(name, head.labels, np.array(counts), out / f"{_slug(name)}_confusion.png")
    for group, head in heads.items():
        if head.groups and encoded.labelled[group].any():
            report["fairness"][group] = _group_table(heads, group, raw, encoded)
            _plot_fairness(group, heads, report["fairness"][group], out / f"fairness_by_{_slug(group)}.png")
    trust = trust_section(heads, raw, encoded, out)  # calibrated heads only
    if trust is not None:
        report["trust"] = trust
    if shifts:  # optional: one more pass over the test rows per shift
        report["robustness"] = robustness_section(net, table_or_df, report["heads"], shifts, inputs=inputs,
                                                  batch_size=batch_size)  # fmt: skip
    report = _json_safe(report)
    (out / "metrics.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(net, report))
    return report


# ---- files ------------------------------------------------------------------------------------


_slug = slug


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def _interval_text(interval: dict | None) -> str:
    return f"{interval['metric']} {md.cell(interval['low'])}-{md.cell(interval['high'])}" if interval else "–"


def _markdown(net, report: dict) -> str:
    heads = report["heads"]
    arrow = {name: "↑" if h["higher_is_better"] else "↓" for name, h in heads.items()}
    model = f"{net.backbone} at {net.image_size} px" if getattr(net, "backbone", None) else type(net).__name__
    if getattr(net, "tta", None) == "flip":
        model += ", answers averaged over each image and its mirror image (tta: flip)"
    lines = [f"# {report['title']}", ""] + ([report["note"], ""] if report["note"] else [])
    lines += [f"Model: {model}; heads: " + ", ".join(f"{n} ({h['kind']})" for n, h in heads.items()) + ".",
              f"Rows evaluated: {report['rows']}" + (f"; skipped {len(report['skipped'])} unreadable or invalid "
              "rows (listed in metrics.json)" if report["skipped"] else "") + ".",
              "Every metric uses the rows labelled for that head. ↓ lower is better, ↑ higher is better.",
              "", "## Metrics per head", "",
              f"The interval is a {LEVEL:.0%} percentile bootstrap of each head's primary metric ({RESAMPLES} "
              "resamples of the labelled rows): how much the metric could move on another test set of this size.",
              ""]  # fmt: skip
    names = [m for m in METRIC_ORDER if any(m in h["metrics"] for h in heads.values())]
    names += sorted({m for h in heads.values() for m in h["metrics"]} - set(names))
    lines += md.table(
        ["head", "kind", "labelled rows", *names, f"{LEVEL:.0%} interval"],
        [[n, h["kind"], h["labelled"], *(h["metrics"].get(m) for m in names), _interval_text(h.get("interval"))]
         for n, h in heads.items()],
    )  # fmt: skip
    for name, bins in report["by_range"].items():
        lines += [f"## {name}: error by true value", "",
                  "Mean absolute error and mean signed error (prediction − truth; > 0 means too high) per range.", "",
                  f"![{name} errors]({_slug(name)}_errors.png)", ""]  # fmt: skip
        lines += md.table([f"true {name}", "rows", "MAE", "mean error"],
                        [[b["range"], b["rows"], b["mae"], b["bias"]] for b in bins])  # fmt: skip
    for name, confusion in report["confusion"].items():
        labels = [str(label) for label in confusion["labels"]]
        lines += [f"## {name}: confusion matrix", "", "Rows: true label; columns: predicted label (counts).", "",
                  f"![{name} confusion]({_slug(name)}_confusion.png)", ""]  # fmt: skip
        counts = [[label, *row] for label, row in zip(labels, confusion["counts"])]
        lines += md.table(["true \\ predicted", *labels], counts)
    if report["fairness"]:
        lines += [
            "## Fairness: every head's primary metric per group",
            "",
            "Groups are the true labels of each classifier head. The gap row is the difference between the "
            "best and the worst group; small groups give noisy numbers, so read them with their size.",
            "",
        ]
    for group, table in report["fairness"].items():
        header = [group, "rows", *(f"{n} {heads[n]['primary']} {arrow[n]}" for n in heads)]
        rows = [[g["group"], g["rows"], *(g["metrics"][n] for n in heads)] for g in table["groups"]]
        gap = [table["gaps"].get(n) for n in heads]
        rows.append(["gap (best − worst)", "", *(f"{md.cell(x['gap'])} ({x['best']} vs {x['worst']})" if x else "–"
                                                  for x in gap)])  # fmt: skip
        lines += [f"### by {group}", "", f"![fairness by {group}](fairness_by_{_slug(group)}.png)", ""]
        lines += md.table(header, rows)
    lines += trust_lines(report)
    lines += robustness_lines(report)
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------


def _plot_regression(name: str, true: np.ndarray, predicted: np.ndarray, bins: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.scatter(true, predicted, s=6, alpha=0.4)
    low, high = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
    left.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1)
    left.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"{name}: predicted vs true")
    right.bar([b["range"] for b in bins], [b["mae"] for b in bins], color="#1f77b4")
    for i, b in enumerate(bins):
        right.annotate(f"n={b['rows']}", (i, b["mae"]), ha="center", va="bottom", fontsize=7)
    right.set(xlabel=f"true {name}", ylabel="MAE", title=f"{name}: MAE by true value")
    right.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_confusion(name: str, labels: list, counts: np.ndarray, path: Path) -> None:
    plt = pyplot()
    k = len(labels)
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * k, 2 + 0.6 * k))
    for ax, values, what in ((axes[0], counts, "counts"), (axes[1], normalised, "share of each true label")):
        ax.imshow(values, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), [str(lab) for lab in labels], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), [str(lab) for lab in labels], fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=f"{name}: {what}")
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    text = f"{values[i, j]:.2f}" if values is normalised else str(int(values[i, j]))
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] > values.max() / 2 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_fairness(group: str, heads: dict[str, Head], table: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(heads), figsize=(3.4 * len(heads), 3.4), squeeze=False)
    labels = [str(g["group"]) for g in table["groups"]]
    for ax, (name, head) in zip(axes[0], heads.items()):
        values = [g["metrics"][name] for g in table["groups"]]
        ax.bar(labels, [np.nan if v is None else v for v in values], color="#1f77b4")
        ax.set_title(f"{name} {head.primary} by {group}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
