"""Shared pieces of the format converters: the row error, cell readers, turn checks, the unified row."""

from __future__ import annotations

import json
from typing import Any

USER_SIDE = ("user", "observation")  # even positions: what the model reads
ASSISTANT_SIDE = ("assistant", "function")  # odd positions: what the model writes
Message = dict[str, str]


class RowError(ValueError):
    """A row that cannot be aligned; the message names the field, the reason groups dropped rows."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def cell_text(row: dict[str, Any], column: str | None, field: str, required: bool = False) -> str:
    """A string cell; a non-string, or a missing or blank required cell, is a RowError naming the column.
    A number (a JSON or parquet column of numbers) is taken as its text; CSV columns are read as text
    (tasks.sources), so "007" stays "007"."""
    value = row.get(column) if column else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        raise RowError(f"field '{column}' ({field}) must be a string, got {type(value).__name__}",
                       f"'{column}' is not a string")
    if value is None or not value.strip():
        if required:
            raise RowError(f"field '{column}' ({field}) is empty", f"'{column}' is empty")
        return ""
    return value


def tools_cell(row: dict[str, Any], column: str | None) -> str:
    """The tool descriptions as a JSON string ('' if none); templates json.loads it, so it must parse."""
    value = row.get(column) if column else None
    if value is None or value == "":
        return ""
    if isinstance(value, (list, dict)):  # the JSON loader may have parsed the tools already
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise RowError(f"field '{column}' (tools) must be a JSON string, got {type(value).__name__}",
                       f"'{column}' is not a string")
    try:
        json.loads(value)
    except ValueError:
        raise RowError(f"field '{column}' (tools) is not valid JSON", f"'{column}' is not valid JSON") from None
    return value


def turn_content(value: Any, where: str, column: str) -> str:
    """A turn's text: a non-empty string, else a RowError naming the turn."""
    if value is not None and not isinstance(value, str):
        raise RowError(f"{where} has non-string content ({type(value).__name__})", f"'{column}': non-string turn")
    if value is None or not value.strip():
        raise RowError(f"{where} is empty", f"'{column}': empty turn")
    return value


def check_side(role: str, position: int, where: str, column: str) -> None:
    """User-side roles sit at even positions, assistant-side roles at odd ones."""
    side, expected = (USER_SIDE, "a user-side") if position % 2 == 0 else (ASSISTANT_SIDE, "an assistant-side")
    if role not in side:
        raise RowError(f"{where} has role '{role}', expected {expected} turn ({' or '.join(side)})",
                       f"'{column}': wrong turn order")


def split_turns(messages: list[Message], kind: str, column: str) -> tuple[list[Message], list[Message]]:
    """(prompt, response): sft/kto rows end with the reply; a preference prompt ends on the user side."""
    if kind == "preference":
        if len(messages) % 2 == 0:
            raise RowError(f"'{column}' ends with an assistant turn; a preference prompt ends with a user turn",
                           f"'{column}': even number of turns")
        return messages, []
    if len(messages) % 2:
        raise RowError(f"'{column}' ends with a user turn; it needs an assistant reply",
                       f"'{column}': odd number of turns")
    return messages[:-1], messages[-1:]


def unified(prompt: list[Message], response: list[Message], system: str = "", tools: str = "",
            kto_tag: bool | None = None, text: str = "") -> dict[str, Any]:
    """One row of the unified schema (the source row index is added by the align stage)."""
    return {"prompt": prompt, "response": response, "system": system, "tools": tools, "kto_tag": kto_tag,
            "text": text}
