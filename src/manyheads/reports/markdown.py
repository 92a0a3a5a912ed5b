"""Markdown tables: the one writer every report uses.

table(["head", "mae"], [["age", 4.71]])  # ["| head | mae |", "|---|---|", "| age | 4.71 |", ""]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell: floats to 4 significant digits, missing or non-finite as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """The lines of a Markdown table, with a blank line after it."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows] + [""]


def frame(df: Any) -> str:
    """A pandas DataFrame as one Markdown table (no index)."""
    return "\n".join(table(list(df.columns), list(df.itertuples(index=False)))).rstrip("\n")
