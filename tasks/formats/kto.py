"""KTO rows: one reply plus a boolean label saying whether it is desirable."""

from __future__ import annotations

from typing import Any

from tasks.formats.common import RowError


def label(row: dict[str, Any], column: str) -> bool:
    """The kto_tag cell: strictly true or false (a string 'true' is a data error, not a guess)."""
    value = row.get(column)
    if not isinstance(value, bool):
        shown = "missing" if value is None else f"{type(value).__name__} {value!r}"
        raise RowError(f"field '{column}' (kto_tag) must be true or false, got {shown}",
                       f"'{column}' is not a boolean")
    return value
