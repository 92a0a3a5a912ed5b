"""Rows left out: the one record of a bad row, and the error that names one.

Every stage that can refuse a row (an image that does not decode, a label a head cannot encode,
NaN in a numeric input) describes it with a :class:`BadRow`; ``on_bad="error"`` raises a
:class:`RowError` with the same message instead. ``result.skipped``, ``summary.json`` and the
evaluation report list the records.

    BadRow(row=7, reason="truncated JPEG", message="faces/7.jpg: truncated JPEG", source="faces/7.jpg")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BadRow:
    """A row left out: the row as the user's table names it, a short reason to count by, the full message.

    ``row`` is a position in the table passed in, or its index label; ``source`` the file of an
    image; ``split`` is "validation" for a row of the validation data.
    """

    row: Any
    reason: str
    message: str
    source: str | None = None
    split: str | None = None

    def at(self, row: Any, split: str | None = None) -> BadRow:
        """The same record for another row name (and split)."""
        return dataclasses.replace(self, row=row, split=split or self.split)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (no empty fields), as ``summary.json`` and ``metrics.json`` list it."""
        row = self.row if isinstance(self.row, int | float | str) else str(self.row)  # an index label of any type
        record = {"row": row, "reason": self.reason, "message": self.message}
        record |= {key: value for key, value in (("source", self.source), ("split", self.split)) if value}
        return record


class RowError(ValueError):
    """A value that cannot be used; the message names the row (file, or head, column and row).

    ``reason`` is the short reason that skip counts group by ("label not a number").
    """

    def __init__(self, message: str, reason: str = "bad row") -> None:
        super().__init__(message)
        self.reason = reason

    def bad_row(self, row: Any) -> BadRow:
        """This error as the record of a skipped row."""
        return BadRow(row, self.reason, str(self))
