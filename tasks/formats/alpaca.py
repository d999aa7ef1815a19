"""Alpaca rows: instruction (+ input) as the user turn, output as the reply, history as earlier pairs."""

from __future__ import annotations

from typing import Any

from tasks.formats.common import Message, RowError, cell_text, tools_cell, turn_content

REQUIRED = {"sft": ("prompt", "response"), "kto": ("prompt", "response", "kto_tag"),
            "preference": ("prompt", "chosen", "rejected"), "pretrain": ("prompt",)}
OPTIONAL = ("query", "history", "system", "tools")


def history_turns(row: dict[str, Any], column: str | None) -> list[Message]:
    """Earlier [user, assistant] pairs as alternating messages."""
    pairs = row.get(column) if column else None
    if pairs is None:
        return []
    if not isinstance(pairs, list):
        raise RowError(f"field '{column}' (history) must be a list of [user, assistant] pairs",
                       f"'{column}' is malformed")
    messages = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise RowError(f"field '{column}' (history), pair {index}: expected [user, assistant]",
                           f"'{column}' is malformed")
        for role, content in zip(("user", "assistant"), pair, strict=True):
            where = f"field '{column}' (history), pair {index}: the {role} turn"
            messages.append({"role": role, "content": turn_content(content, where, column)})
    return messages


def user_text(row: dict[str, Any], columns: dict[str, str | None]) -> str:
    """The user turn: 'prompt\\nquery', as LlamaFactory joins them; one of the two must be non-empty."""
    parts = [cell_text(row, columns.get("prompt"), "prompt"), cell_text(row, columns.get("query"), "query")]
    text = "\n".join(p for p in parts if p)
    if not text:
        raise RowError(f"field '{columns['prompt']}' (prompt) is empty", f"'{columns['prompt']}' is empty")
    return text


def dialogue(row: dict[str, Any], columns: dict[str, str | None], kind: str) -> tuple[str, str, list[Message]]:
    """(system, tools, messages): history, the user turn and, unless ranking, the reply."""
    messages = history_turns(row, columns.get("history"))
    messages.append({"role": "user", "content": user_text(row, columns)})
    if kind != "preference":
        messages.append({"role": "assistant", "content": cell_text(row, columns["response"], "response", True)})
    return cell_text(row, columns.get("system"), "system"), tools_cell(row, columns.get("tools")), messages
