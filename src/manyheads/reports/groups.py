"""Groups of rows the reports break results down by: ranges of a true value (decades for ages), file-safe names.

value_ranges(np.array([3, 25, 71]))  # [("0-9", 0, 10, mask), ("20-29", 20, 30, mask), ("70-79", 70, 80, mask)]
"""

from __future__ import annotations

import math
import re

import numpy as np


def slug(name: str) -> str:
    """A head name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def bin_width(span: float) -> float:
    """A power of ten giving 4 or more bins (decades for ages), doubled or times 5 to keep 12 at most."""
    base = 10.0 ** math.floor(math.log10(max(span, 1e-9) / 4))
    for step in (1, 2, 5):
        if span / (base * step) <= 12:
            return base * step
    return base * 10


def value_ranges(true: np.ndarray) -> list[tuple[str, float, float, np.ndarray]]:
    """(label, low, high, row mask) per range ``[low, high)`` of the true values that holds rows, in order."""
    width = bin_width(float(true.max() - true.min()))
    start = math.floor(true.min() / width) * width
    index = np.floor((true - start) / width + 1e-9).astype(int)
    whole = width >= 1 and float(width).is_integer() and np.all(true == np.round(true))
    ranges = []
    for i in np.unique(index):
        low, high = start + i * width, start + (i + 1) * width
        ranges.append((f"{low:g}-{high - 1:g}" if whole else f"[{low:g}, {high:g})", low, high, index == i))
    return ranges
