"""OpenAI chat rows: sharegpt with role/content keys, plus assistant tool_calls and tool results."""

from __future__ import annotations

import json
from typing import Any

from tasks.formats import sharegpt
from tasks.formats.common import Message, RowError, tools_cell
from tasks.templates.tools import calls_text, results_text

REQUIRED = sharegpt.REQUIRED
OPTIONAL = sharegpt.OPTIONAL


def call_content(calls: list[Any], where: str, column: str) -> str:
    """Assistant tool_calls as the function turn's JSON (`calls_text`), arguments decoded: one call as its
    {"name", "arguments"} object, as Qwen's and LlamaFactory's tool calls are written."""
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise RowError(f"{where} has a tool call without function.name", f"'{column}': malformed tool call")
        arguments = function.get("arguments")
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string; templates want the object
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise RowError(f"{where} has tool call arguments that are not valid JSON",
                               f"'{column}': malformed tool call") from None
        out.append({"name": function["name"], "arguments": arguments or {}})
    return calls_text(out)


def normalize(indexed: list[tuple[int, dict[str, Any]]], tags: dict[str, str | None],
              column: str) -> list[tuple[int, dict[str, Any]]]:
    """Tool calls become function turns; consecutive tool results merge into one observation turn."""
    role, content = tags["role_tag"], tags["content_tag"]
    out: list[tuple[int, dict[str, Any]]] = []
    results: list[Any] = []
    for index, turn in indexed:
        if turn.get("tool_calls") and turn.get(role) == tags["assistant_tag"]:
            where = f"turn {index} of '{column}'"
            turn = {role: tags["function_tag"], content: call_content(turn["tool_calls"], where, column)}
        if turn.get(role) == tags["observation_tag"] and out and out[-1][1].get(role) == tags["observation_tag"]:
            results.append(turn.get(content))  # several results answer one parallel call
            bad = [r for r in results if not isinstance(r, str)]  # left for the turn check to report
            merged = bad[0] if bad else results_text(results)
            out[-1] = (out[-1][0], {role: tags["observation_tag"], content: merged})
            continue
        results = [turn.get(content)]
        out.append((index, turn))
    return out


def dialogue(row: dict[str, Any], columns: dict[str, str | None],
             tags: dict[str, str | None]) -> tuple[str, str, list[Message]]:
    """(system, tools, messages) of an OpenAI-style row."""
    column = columns["messages"]
    system, indexed = sharegpt.split_system(row, sharegpt.turn_list(row, column), columns, tags)
    if not indexed:
        raise RowError(f"field '{column}' (messages) holds only a system turn", f"'{column}' is empty")
    messages = sharegpt.aligned_turns(normalize(indexed, tags, column), tags, column)
    return system, tools_cell(row, columns.get("tools")), messages
