"""ShareGPT rows: a list of {from, value} turns (names set by tags), an optional system turn first."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tasks.formats.common import Message, RowError, cell_text, check_side, tools_cell, turn_content

REQUIRED = {"sft": ("messages",), "kto": ("messages", "kto_tag"), "preference": ("messages", "chosen", "rejected")}
OPTIONAL = ("system", "tools")
ROLE_OF_TAG = {"user_tag": "user", "observation_tag": "observation", "assistant_tag": "assistant",
               "function_tag": "function"}


def role_map(tags: dict[str, str | None]) -> dict[str, str]:
    """Tag value in the data -> unified role."""
    return {tags[tag]: role for tag, role in ROLE_OF_TAG.items() if tags.get(tag)}


def turn_list(row: dict[str, Any], column: str) -> list[dict[str, Any]]:
    """The row's turns: a non-empty list of objects."""
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{column}' (messages) must be a non-empty list of turns", f"'{column}' is empty")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {index} of '{column}' is not an object", f"'{column}' is malformed")
    return turns


def to_message(turn: dict[str, Any], tags: dict[str, str | None], roles: dict[str, str], where: str,
               column: str) -> Message:
    """One turn as {role, content}; an unknown role tag is a RowError listing the known ones."""
    tag = turn.get(tags["role_tag"])
    if tag is not None and tag == tags.get("system_tag"):  # a known tag, in a place templates have none for
        raise RowError(f"{where} is a system turn ({tags['role_tag']} {tag!r}); only the first turn may be one",
                       f"'{column}': system turn not first")
    if tag not in roles:
        known = ", ".join(repr(t) for t in roles)
        raise RowError(f"{where} has unknown {tags['role_tag']!r} {tag!r} (known: {known})",
                       f"'{column}': unknown role")
    return {"role": roles[tag], "content": turn_content(turn.get(tags["content_tag"]), where, column)}


def aligned_turns(indexed: Iterable[tuple[int, dict[str, Any]]], tags: dict[str, str | None],
                  column: str) -> list[Message]:
    """Turns in strict user-side/assistant-side alternation; errors name the turn's index in the source."""
    messages, roles = [], role_map(tags)
    for index, turn in indexed:
        where = f"turn {index} of '{column}'"
        message = to_message(turn, tags, roles, where, column)
        source_tag = f"{where} ({tags['role_tag']} {turn.get(tags['role_tag'])!r})"  # the name used in the file
        check_side(message["role"], len(messages), source_tag, column)
        messages.append(message)
    return messages


def split_system(row: dict[str, Any], turns: list[dict[str, Any]], columns: dict[str, str | None],
                 tags: dict[str, str | None]) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """(system, remaining indexed turns): a leading system turn overrides the system column."""
    indexed = list(enumerate(turns))
    if tags.get("system_tag") and turns[0].get(tags["role_tag"]) == tags["system_tag"]:
        content = turns[0].get(tags["content_tag"])
        if content is not None and not isinstance(content, str):
            raise RowError(f"turn 0 of '{columns['messages']}' (system) has non-string content",
                           f"'{columns['messages']}': non-string turn")
        return content or "", indexed[1:]
    return cell_text(row, columns.get("system"), "system"), indexed


def dialogue(row: dict[str, Any], columns: dict[str, str | None],
             tags: dict[str, str | None]) -> tuple[str, str, list[Message]]:
    """(system, tools, messages) of a sharegpt row."""
    column = columns["messages"]
    system, indexed = split_system(row, turn_list(row, column), columns, tags)
    if not indexed:
        raise RowError(f"field '{column}' (messages) holds only a system turn", f"'{column}' is empty")
    return system, tools_cell(row, columns.get("tools")), aligned_turns(indexed, tags, column)
