"""Thinking blocks of reasoning templates (LlamaFactory's ReasoningTemplate), rendered as the published
templates write them.

A reply's reasoning sits inside the template's `thought_words`, e.g. '<think>\\n' ... '\\n</think>\\n\\n'.
- Replies in history lose their thinking block, as Qwen3's published template drops them (LlamaFactory
  drops them only with mask_history), except the replies after the last user message: the steps of the
  agentic exchange in progress (tool calls and the replies between their results) keep theirs, as there.
  `preserve_thinking` keeps them all, and then, as in LlamaFactory, every reply written without a block
  gets an empty one.
- The last reply keeps its block; written without one, it gets an empty block. With `enable_thinking`
  (the default) that block is trained, so the model learns to open its reasoning; with
  `enable_thinking: false` every block is removed from the replies and the empty block joins the
  prompt (untrained), which is what a published `enable_thinking=False` generation prompt writes.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.templates.base import Template


def has_thought(template: Template, content: str) -> bool:
    """Whether a reply already writes (part of) a thinking block."""
    return any(word.strip() in content for word in template.thought_words)


def remove_thought(template: Template, content: str) -> str:
    """The reply without its thinking block(s)."""
    opening, closing = (re.escape(word) for word in template.thought_words)
    return re.sub(f"{opening}(.*?){closing}", "", content, flags=re.DOTALL).lstrip("\n")


def split_thought(template: Template, content: str) -> tuple[str, str]:
    """(the reply's thinking block as written, the rest): a tool call's JSON can follow its reasoning, as in
    LlamaFactory's FunctionFormatter, which writes the block and then the formatted calls."""
    if not template.thought_words:
        return "", content
    opening, closing = (re.escape(word) for word in template.thought_words)
    match = re.search(f"{opening}(.*?){closing}", content, flags=re.DOTALL)
    return (match.group(0), content.replace(match.group(0), "", 1)) if match else ("", content)


def strip_thoughts(template: Template, messages: list[dict]) -> list[dict]:
    """Messages with the thinking blocks removed that this template and its options do not render."""
    if not template.thought_words:
        return messages
    last = len(messages) - 1
    # the replies from the last user message on (its tool calls, results and answer) keep their reasoning
    current = max((index for index, message in enumerate(messages) if message["role"] == "user"), default=last)
    kept = []
    for index, message in enumerate(messages):
        history = index < current and not template.preserve_thinking
        drop = index % 2 == 1 and (not template.enable_thinking or (history and index != last))
        kept.append({**message, "content": remove_thought(template, message["content"])} if drop else message)
    return kept


def add_empty_thoughts(template: Template, messages: list[dict], pairs: list[tuple[str, str]]
                       ) -> list[tuple[str, str]]:
    """(prompt, response) texts with an empty thinking block before each reply that needs one."""
    if not template.thought_words or not pairs:
        return pairs
    empty = "".join(template.thought_words)
    turns = range(len(pairs)) if template.preserve_thinking else [len(pairs) - 1]
    pairs = list(pairs)
    for turn in turns:
        if has_thought(template, messages[2 * turn + 1]["content"]):
            continue
        prompt, response = pairs[turn]
        pairs[turn] = (prompt, empty + response) if template.enable_thinking else (prompt + empty, response)
    return pairs
