"""Preference (ranking) rows: the prompt ends on the user side; the response is [chosen, rejected]."""

from __future__ import annotations

from typing import Any

from tasks.formats.common import ASSISTANT_SIDE, Message, RowError, cell_text, turn_content
from tasks.formats.sharegpt import role_map


def alpaca_pair(row: dict[str, Any], columns: dict[str, str | None]) -> list[Message]:
    """Chosen and rejected answers given as strings."""
    return [{"role": "assistant", "content": cell_text(row, columns[side], side, required=True)}
            for side in ("chosen", "rejected")]


def chat_answer(row: dict[str, Any], column: str, field: str, tags: dict[str, str | None]) -> Message:
    """One answer given as a message object (a plain string is taken as an assistant turn)."""
    value = row.get(column)
    if isinstance(value, str) or value is None:
        return {"role": "assistant", "content": cell_text(row, column, field, required=True)}
    if not isinstance(value, dict):
        raise RowError(f"field '{column}' ({field}) must be a message object, got {type(value).__name__}",
                       f"'{column}' is malformed")
    tag = value.get(tags["role_tag"])
    role = role_map(tags).get(tag)
    if role not in ASSISTANT_SIDE:
        raise RowError(f"field '{column}' ({field}) has role {tag!r}, expected an assistant-side turn",
                       f"'{column}': wrong role")
    return {"role": role, "content": turn_content(value.get(tags["content_tag"]), f"field '{column}' ({field})",
                                                  column)}


def chat_pair(row: dict[str, Any], columns: dict[str, str | None], tags: dict[str, str | None]) -> list[Message]:
    """Chosen and rejected answers of a sharegpt/openai row."""
    return [chat_answer(row, columns[side], side, tags) for side in ("chosen", "rejected")]
