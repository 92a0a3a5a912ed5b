"""History column names: ``split/head/metric`` (``val/age/mae``), built and parsed in one place.

Also ``weight/<head>`` for a head's effective weight, and plain names (``epoch``, ``lr``).

    name("val", "age", "mae")   # "val/age/mae"
    parse("val/age/mae")        # Column(split="val", head="age", metric="mae")
"""

from __future__ import annotations

from typing import NamedTuple

SPLITS = ("train", "val", "test")
TOTAL = "total"  # the pseudo-head of the weighted total loss


class Column(NamedTuple):
    """A parsed ``split/head/metric`` column."""

    split: str
    head: str
    metric: str


def name(split: str, head: str, metric: str) -> str:
    """The history column of one head's metric on one split."""
    return f"{split}/{head}/{metric}"


def weight(head: str) -> str:
    """The history column of a head's effective weight."""
    return f"weight/{head}"


def parse(column: str) -> Column | None:
    """``split/head/metric`` split into its parts; None for other columns (``epoch``, ``weight/age``)."""
    parts = column.split("/")
    if len(parts) != 3 or parts[0] not in SPLITS:
        return None
    return Column(*parts)


def head_of(column: str) -> str:
    """The head a (possibly short) column names: ``val/age/mae``, ``age/mae`` and ``age`` all give "age"."""
    parts = column.split("/")
    return parts[1] if parts[0] in SPLITS and len(parts) > 1 else parts[0]


def qualify(short: str, split: str) -> str:
    """A full column from a short form: ``"age/mae"`` -> ``"val/age/mae"``, ``"age"`` -> ``"val/age/loss"``."""
    column = short if short.split("/")[0] in SPLITS else f"{split}/{short}"
    return column + "/loss" if column.count("/") == 1 else column
