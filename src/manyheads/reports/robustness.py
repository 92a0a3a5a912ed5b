"""The evaluation report's robustness section: each head's primary metric under each shift, against clean.

report["robustness"] = robustness_section(net, test_df, report["heads"], "zoom_out,jpeg30", inputs="image")
lines += robustness_lines(report)  # the Markdown section; none without report["robustness"]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from manyheads import robustness
from manyheads.reports import markdown as md

SEED = 0  # the shifts' seed: every report draws the same shifted images


def robustness_section(
    net,
    data: Any,
    heads: dict[str, dict],
    shifts: bool | str | Sequence[str] | None = True,
    *,
    inputs: str | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """One row per shift (first "none", the clean metrics in ``heads``): each head's primary metric and its change.

    ``heads`` is the report's per-head entries (``primary`` and ``metrics``); a change is shifted minus clean.

        robustness_section(net, test_df, report["heads"])["shifts"][1]  # {"shift": "zoom_out", "metrics": ...}
    """
    names = robustness.shift_names(shifts)
    clean = {name: head["metrics"].get(head["primary"]) for name, head in heads.items()}
    rows = [{"shift": robustness.CLEAN, "description": "the test images as they are", "metrics": clean,
             "change": {name: 0.0 if value is not None else None for name, value in clean.items()}}]  # fmt: skip
    scored = robustness.scores(net, data, names, inputs=inputs, seed=SEED, batch_size=batch_size)
    for name, values in scored.items():
        change = {head: None if values[head] is None or clean[head] is None else values[head] - clean[head]
                  for head in clean}  # fmt: skip
        rows.append({"shift": name, "description": robustness.SHIFTS[name].description, "metrics": values,
                     "change": change})  # fmt: skip
    return {"seed": SEED, "shifts": rows}


def _cell(value: float | None, change: float | None, clean: bool) -> str:
    if value is None or clean or change is None:
        return md.cell(value)
    return f"{md.cell(value)} ({change:+.3g})"


def robustness_lines(report: dict[str, Any]) -> list[str]:
    """The Markdown section for ``report["robustness"]``; no lines when the report has none."""
    section = report.get("robustness")
    if not section:
        return []
    heads = report["heads"]
    arrow = {name: "↑" if h["higher_is_better"] else "↓" for name, h in heads.items()}
    lines = ["## Robustness: every head's primary metric on shifted photos", "",
             "Each shift is applied to the decoded test image before it is resized to the net's size, so it acts "
             f"like another photo of the same face (seed {section['seed']}); the net then answers again on every "
             "test row. In brackets: the change against the clean images (none).", ""]  # fmt: skip
    header = ["shift", "what", *(f"{n} {heads[n]['primary']} {arrow[n]}" for n in heads)]
    rows = [[r["shift"], r["description"],
             *(_cell(r["metrics"].get(n), r["change"].get(n), r["shift"] == robustness.CLEAN) for n in heads)]
            for r in section["shifts"]]  # fmt: skip
    return lines + md.table(header, rows)
