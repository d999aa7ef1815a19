"""Dataset formats: pure converters from a source row (a dict) to one row of the unified schema.

Unified row: prompt (turns up to the last user-side one), response (sft/kto: [reply]; preference:
[chosen, rejected]; pretrain: []), system, tools (JSON string), kto_tag (bool or None), text.
"""

from __future__ import annotations

from typing import Any

from tasks.formats import alpaca, kto, openai, preference, pretrain, sharegpt
from tasks.formats.common import RowError, split_turns, unified

__all__ = ["RowError", "convert_row", "dataset_kind", "field_columns"]
MODULES = {"alpaca": alpaca, "sharegpt": sharegpt, "openai": openai}
MEDIA = ("images", "videos", "audios")


def dataset_kind(formatting: str, columns: dict[str, str | None], ranking: bool) -> str:
    """sft, preference, kto or pretrain, read from the entry as LlamaFactory does."""
    if ranking:
        return "preference"
    if columns.get("kto_tag"):
        return "kto"
    if formatting == "alpaca" and not columns.get("response"):
        return "pretrain"  # {"columns": {"prompt": "text"}}: documents, no replies
    return "sft"


def field_columns(formatting: str, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) column fields a dataset of this formatting and kind reads."""
    module = MODULES[formatting]
    if kind not in module.REQUIRED:
        raise ValueError(f"the {formatting} formatting has no {kind} datasets")
    return module.REQUIRED[kind], ("query",) if kind == "pretrain" else module.OPTIONAL


def convert_row(row: dict[str, Any], formatting: str, kind: str, columns: dict[str, str | None],
                tags: dict[str, str | None]) -> dict[str, Any]:
    """One source row in the unified schema; an invalid row raises RowError naming the field."""
    if kind == "pretrain":
        return pretrain.convert(row, columns)
    if formatting == "alpaca":
        system, tools, messages = alpaca.dialogue(row, columns, kind)
    else:
        system, tools, messages = MODULES[formatting].dialogue(row, columns, tags)
    source = columns.get("messages") or columns.get("response") or columns["prompt"]
    prompt, response = split_turns(messages, kind, source)
    if kind == "preference":
        alpaca_style = formatting == "alpaca"
        response = preference.alpaca_pair(row, columns) if alpaca_style else preference.chat_pair(row, columns, tags)
    label = kto.label(row, columns["kto_tag"]) if kind == "kto" else None
    return unified(prompt, response, system, tools, label)
