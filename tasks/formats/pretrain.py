"""Pretraining rows: alpaca with only a prompt column; the text is the document, there is no reply."""

from __future__ import annotations

from typing import Any

from tasks.formats.alpaca import user_text
from tasks.formats.common import unified


def convert(row: dict[str, Any], columns: dict[str, str | None]) -> dict[str, Any]:
    """A document row: text, mirrored as one user turn so chat-shaped consumers can read it too."""
    text = user_text(row, columns)
    return unified([{"role": "user", "content": text}], [], text=text)
