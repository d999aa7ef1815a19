"""KTO rows: one reply plus a boolean label saying whether it is desirable."""

from __future__ import annotations

from typing import Any

from tasks.formats.common import RowError

BOOLEAN_TEXT = {"true": True, "false": False}


def label(row: dict[str, Any], column: str) -> bool:
    """The kto_tag cell: a boolean, or the text true or false in any case (a CSV file's cells are all read as
    text, see tasks.sources.csv_text_features; pandas reads that column as booleans for LlamaFactory).
    Anything else (1, "yes", missing) is a data error, not a guess."""
    value = row.get(column)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_TEXT:
        return BOOLEAN_TEXT[value.strip().lower()]
    if not isinstance(value, bool):
        shown = "missing" if value is None else f"{type(value).__name__} {value!r}"
        raise RowError(f"field '{column}' (kto_tag) must be true or false, got {shown}",
                       f"'{column}' is not a boolean")
    return value
