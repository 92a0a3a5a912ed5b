"""The report's "Can you trust the answers?" section: calibration of probabilities, coverage of intervals.

For each calibrated classifier head: the expected calibration error (15 bins, top label) before
and after temperature scaling, and a reliability diagram. For each calibrated number: the share
of test rows whose true value lies in the interval (coverage) and the interval's mean width, for
the plain and the adaptive interval, overall and per group (ranges of the true value, and the
true labels of every classifier head): coverage by group is a fairness question too.

    section = trust_section(net.heads, raw, encoded, out_dir)  # None for a net without calibration
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from manyheads import encoding
from manyheads.heads import Head
from manyheads.reports import markdown as md
from manyheads.reports.groups import slug, value_ranges
from manyheads.reports.plots import pyplot

BINS = 15  # the usual ECE bins (Guo et al. 2017)
SHORTFALL = 0.05  # a group whose coverage is further than this from nominal is named in the report ...
MIN_GROUP_ROWS = 100  # ... if it has this many rows: below, chance alone moves coverage by more (sd 3 points at 100)


def calibration_error(probabilities: torch.Tensor, target: torch.Tensor) -> float:
    """Top-label expected calibration error in ``BINS`` equal-width bins (torchmetrics).

    [N, k] class probabilities with class targets, or [N, k] per-label sigmoids with 0/1 targets
    (every label's yes/no answer counted as one prediction).
    """
    from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

    if probabilities.shape == target.shape:  # independent sigmoids: each label is a binary answer
        return float(binary_calibration_error(probabilities.reshape(-1), target.reshape(-1).long(), n_bins=BINS))
    k = probabilities.shape[1]
    return float(multiclass_calibration_error(probabilities, target.long(), num_classes=k, n_bins=BINS))


def _reliability(probabilities: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, rows) per confidence bin, for the diagram."""
    if probabilities.shape == target.shape:
        p, t = probabilities.reshape(-1), target.reshape(-1)
        confidence, correct = torch.maximum(p, 1 - p), ((p > 0.5).float() == t).float()
    else:
        confidence, predicted = probabilities.max(dim=1)
        correct = (predicted == target.long()).float()
    index = torch.clamp((confidence * BINS).long(), max=BINS - 1)
    rows = torch.bincount(index, minlength=BINS).double()
    mean_confidence = torch.bincount(index, confidence.double(), minlength=BINS) / rows.clamp(min=1)
    accuracy = torch.bincount(index, correct.double(), minlength=BINS) / rows.clamp(min=1)
    return mean_confidence.numpy(), accuracy.numpy(), rows.numpy()


def _classifier(name: str, head: Head, output: torch.Tensor, target: torch.Tensor, out: Path) -> dict[str, Any]:
    before, after = head.uncalibrated().proba(output), head.proba(output)
    entry = {"temperature": head.calibration_spec()["temperature"], "rows": int(target.shape[0]),
             "ece_before": calibration_error(before, target), "ece_after": calibration_error(after, target),
             "diagram": f"{slug(name)}_reliability.png"}  # fmt: skip
    _plot_reliability(name, _reliability(before, target), _reliability(after, target), out / entry["diagram"])
    return entry


def _coverage(low: np.ndarray, high: np.ndarray, true: np.ndarray) -> dict[str, float]:
    inside = (true >= low) & (true <= high)
    return {"rows": int(true.size), "coverage": float(inside.mean()), "width": float((high - low).mean())}


def _number(head: Head, output: torch.Tensor, true: np.ndarray, groups: dict[str, list]) -> dict[str, Any]:
    intervals = {kind: [x.numpy().astype(float) for x in head.interval(output, kind)] for kind in ("plain", "adaptive")}
    entry: dict[str, Any] = {"nominal": head.coverage, "answered": head.conformal.interval,
                             "method": head.conformal.method, "overall": {}, "groups": {}}  # fmt: skip
    for kind, (low, high) in intervals.items():
        entry["overall"][kind] = _coverage(low, high, true)
    for by, members in groups.items():
        entry["groups"][by] = [
            {"group": label, **{kind: _coverage(low[keep], high[keep], true[keep])
                                for kind, (low, high) in intervals.items()}}
            for label, keep in members if keep.any()
        ]  # fmt: skip
    answered = entry["answered"]
    entry["short"] = [  # groups large enough to tell, whose answered interval misses nominal by more than SHORTFALL
        {"by": by, "group": g["group"], "coverage": g[answered]["coverage"], "rows": g[answered]["rows"]}
        for by, rows in entry["groups"].items() for g in rows
        if abs(g[answered]["coverage"] - head.coverage) > SHORTFALL and g[answered]["rows"] >= MIN_GROUP_ROWS
    ]  # fmt: skip
    return entry


def _groups_of(name: str, heads: Mapping[str, Head], encoded: encoding.Encoded, keep: torch.Tensor) -> dict:
    """Row masks (over the head's labelled rows) per range of its true value and per label of each classifier."""
    true = encoded.targets[name][keep].numpy().astype(float)
    groups = {f"true {name}": [(label, members) for label, _, _, members in value_ranges(true)]}
    for other, head in heads.items():
        if head.groups and other != name:
            labels, labelled = encoded.targets[other][keep].long().numpy(), encoded.labelled[other][keep].numpy()
            groups[other] = [(str(label), labelled & (labels == i)) for i, label in enumerate(head.labels)]
    return groups


def trust_section(
    heads: Mapping[str, Head], raw: Mapping[str, torch.Tensor], encoded: encoding.Encoded, out: Path
) -> dict[str, Any] | None:
    """Calibration and coverage of every calibrated head on the evaluated rows; None when none is calibrated."""
    section: dict[str, Any] = {"classifiers": {}, "numbers": {}}
    for name, head in heads.items():
        keep = encoded.labelled[name]
        if head.calibration_spec() is None or not keep.any():
            continue
        output, target = raw[name][keep], encoded.targets[name][keep]
        if head.continuous:
            true = target.numpy().astype(float)
            section["numbers"][name] = _number(head, output, true, _groups_of(name, heads, encoded, keep))
        else:
            section["classifiers"][name] = _classifier(name, head, output, target, out)
    return section if section["classifiers"] or section["numbers"] else None


# ---- Markdown ---------------------------------------------------------------------------------


def trust_lines(report: Mapping[str, Any]) -> list[str]:
    """The section's Markdown lines (none when the report has no calibrated head)."""
    section = report.get("trust")
    if not section:
        return []
    lines = ["## Can you trust the answers?", ""]
    if section["classifiers"]:
        lines += ["Expected calibration error (ECE, 15 bins, top label): the mean gap between how sure the model "
                  "says it is and how often it is right; 0 is perfect. Temperature scaling divides the logits by one "
                  "number per head, fitted on the calibration rows; it changes no answer, only the probabilities.",
                  ""]  # fmt: skip
        lines += md.table(["head", "temperature", "rows", "ECE before", "ECE after"],
                          [[n, c["temperature"], c["rows"], c["ece_before"], c["ece_after"]]
                           for n, c in section["classifiers"].items()])  # fmt: skip
        lines += [f"![{n} reliability]({c['diagram']})" for n, c in section["classifiers"].items()] + [""]
    for name, entry in section["numbers"].items():
        lines += _number_lines(name, entry)
    return lines


def _number_lines(name: str, entry: Mapping[str, Any]) -> list[str]:
    nominal = entry["nominal"]
    how = "per unit of the head's predicted spread" if entry["method"] == "spread" else "per range of the prediction"
    lines = [f"### {name}: {nominal:.0%} intervals", "",
             f"Split-conformal intervals fitted on the calibration rows. Coverage is the share of these rows whose "
             f"true {name} lies inside; nominal is {nominal:.0%}, on average over people like the calibration rows, "
             f"not a promise for each person. The plain interval has one width; the adaptive one is fitted {how}. "
             f"Answers carry the {entry['answered']} one.", ""]  # fmt: skip
    overall = [[kind, c["rows"], c["coverage"], c["width"]] for kind, c in entry["overall"].items()]
    lines += md.table(["interval", "rows", "coverage", "mean width"], overall)
    for by, rows in entry["groups"].items():
        lines += [f"By {by}:", ""]
        lines += md.table([by, "rows", "plain coverage", "plain width", "adaptive coverage", "adaptive width"],
                          [[g["group"], g["plain"]["rows"], g["plain"]["coverage"], g["plain"]["width"],
                            g["adaptive"]["coverage"], g["adaptive"]["width"]] for g in rows])  # fmt: skip
    short = [f"{s['by']} {s['group']} ({s['coverage']:.1%} of {s['rows']} rows)" for s in entry["short"]]
    sizes = f"(groups of {MIN_GROUP_ROWS} rows or more; smaller ones move that much by chance)"
    if short:
        lines += [f"Groups whose {entry['answered']} interval coverage is more than {SHORTFALL:.0%} from nominal "
                  f"{sizes}: " + "; ".join(short) + ". Their intervals are too narrow (below nominal) or too wide "
                  "(above).", ""]  # fmt: skip
    else:
        lines += [f"Every group's coverage is within {SHORTFALL:.0%} of nominal {sizes}.", ""]
    return lines


def _plot_reliability(name: str, before: tuple, after: tuple, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharey=True)
    for ax, (confidence, accuracy, rows), what in ((axes[0], before, "before"), (axes[1], after, "after")):
        used = rows > 0
        centres = (np.arange(BINS) + 0.5) / BINS
        ax.bar(centres[used], accuracy[used], width=1 / BINS, edgecolor="white", color="#1f77b4", label="accuracy")
        ax.plot(confidence[used], confidence[used], "o", color="#d62728", markersize=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{name}: {what} calibration")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
