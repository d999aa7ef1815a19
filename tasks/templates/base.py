"""The Template record and the pure function that writes a conversation out as prompt/response text.

Format strings hold `{content}` and may hold `{bos_token}` / `{eos_token}`, filled from the tokenizer.
Content is substituted literally (braces in user text are safe). Conventions:
- `user` ends where the assistant's reply starts (it carries the assistant header), so everything in
  `assistant` is trained: write what closes the turn there, `{eos_token}` included where the family
  ends each reply with EOS (for example `"{content}{eos_token}"`).
- `suffix` is written once, after the last reply: for formats whose turns end without an end token
  (EOS after the whole conversation, as Phi-3 renders it), so a fine-tuned model still learns to stop.
- `system_in_user` = "first" / "last" folds the system block into that user turn's content instead of
  writing it before the first turn (Llama-2, Gemma and Mistral v1 use the first; Mistral v3 the last).
- Tool turns: `observation` (a tool result, user side) and `function` (a tool call, assistant side);
  empty means "written like a user turn / an assistant reply". A function message's calls are written
  by the template's `tool_format` (tasks.templates.tools) before they fill `function`.
- `thought_words` (open, close) make a reasoning template (LlamaFactory's ReasoningTemplate): see
  tasks.templates.thinking for how `enable_thinking` / `preserve_thinking` render and mask them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tasks.core.errors import DataError
from tasks.templates import thinking
from tasks.templates.tools import TOOL_FORMATS, fill_tools, write_calls

IGNORE_INDEX = -100
USER_ROLES = ("user", "observation")
ASSISTANT_ROLES = ("assistant", "function")
SYSTEM_PLACES = ("", "first", "last")


@dataclass(frozen=True)
class Template:
    """One chat format as data: how each role's turn is written around its content."""

    name: str
    user: str  # one user turn, ending where the assistant's reply starts
    assistant: str  # one reply, including whatever closes the turn (all of it is trained)
    system: str = "{content}"
    observation: str = ""  # tool result in the user position; "" = written like a user turn
    function: str = ""  # the assistant's tool call; "" = written like a reply
    default_system: str = ""  # used when a row has no system prompt
    prefix: str = ""  # before the first turn (BOS for some families)
    suffix: str = ""  # after the last reply only
    system_in_user: str = ""  # "", "first" or "last": which user turn carries the system block
    stop_words: tuple[str, ...] = ()  # tokens that end a reply at generation time, besides EOS
    description: str = ""  # one line for `tunefactory templates list`
    tool_format: str = "default"  # how tools are listed and calls written (tasks.templates.tools.TOOL_FORMATS)
    tools: str = ""  # how tool definitions join the system prompt ("": the tool format's; placeholders there)
    jinja: bool = False  # ignore the formats above and render with the tokenizer's chat_template (auto)
    empty_system: bool = False  # write the system block even when there is no system text (EXAONE)
    thought_words: tuple[str, ...] = ()  # (open, close) of a thinking block: a reasoning template
    enable_thinking: bool = True  # reasoning templates: train on the thinking block (false: drop it, prompt it)
    preserve_thinking: bool = False  # reasoning templates: keep thinking blocks of replies in history
    # LlamaFactory's efficient_eos: turns end without EOS (the next role token follows), so the first token of each
    # later prompt is labelled EOS and the closing EOS (the suffix) survives truncation (encode.supervised_example)
    efficient_eos: bool = False

    def __post_init__(self) -> None:
        if self.system_in_user not in SYSTEM_PLACES:
            raise ValueError(f"template {self.name}: system_in_user must be one of {SYSTEM_PLACES}")
        if len(self.thought_words) not in (0, 2):
            raise ValueError(f"template {self.name}: thought_words is (open, close)")
        formats = (self.user, self.assistant, self.system, self.observation, self.function)
        if not self.jinja and any(f and "{content}" not in f for f in formats):
            raise ValueError(f"template {self.name}: every turn format needs a {{content}} slot")
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"template {self.name}: tool_format must be one of {sorted(TOOL_FORMATS)}")

    def system_with_tools(self, system: str, tools_json: str) -> str:
        """The system prompt with the row's tool definitions written in as this family lists them."""
        if not tools_json:
            return system
        tools = json.loads(tools_json)
        if not tools:  # "[]": a row of a tool dataset that offers none (a third of glaive_toolcall's)
            return system
        return fill_tools(self.tools or TOOL_FORMATS[self.tool_format].tools, system,
                          tools if isinstance(tools, list) else [tools])

    def turn_format(self, role: str) -> str:
        """The format string for one message role."""
        return {
            "user": self.user,
            "observation": self.observation or self.user,
            "assistant": self.assistant,
            "function": self.function or self.assistant,
        }[role]


def fill(fmt: str, content: str, bos_token: str = "", eos_token: str = "") -> str:
    """Fill a format string: special tokens first, then the content taken literally."""
    return fmt.replace("{bos_token}", bos_token).replace("{eos_token}", eos_token).replace("{content}", content)


def check_roles(messages: list[dict]) -> None:
    """User-side roles at even positions, assistant-side at odd ones; a DataError otherwise."""
    for index, message in enumerate(messages):
        allowed = USER_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        if message["role"] not in allowed:
            raise DataError(
                f"message {index} has role {message['role']!r}; expected {' or '.join(allowed)} there "
                "(turns alternate user|observation, assistant|function, and the system prompt is a separate field)"
            )


def format_pairs(
    template: Template, messages: list[dict], system: str, bos_token: str = "", eos_token: str = ""
) -> list[tuple[str, str]]:
    """(prompt text, response text) per exchange; prefix and system go where the template puts them."""
    check_roles(messages)
    count = len(messages) // 2  # a trailing user turn without a reply has nothing to train on
    messages = thinking.strip_thoughts(template, messages[: 2 * count])
    system_text = system or template.default_system
    # "last": the last exchange a user (not a tool result) opens, as Mistral's template finds it
    last_user = max((turn for turn in range(count) if messages[2 * turn]["role"] == "user"), default=count - 1)
    fold_at = {"first": 0, "last": last_user}.get(template.system_in_user)
    written = system_text or template.empty_system
    system_block = fill(template.system, system_text, bos_token, eos_token) if written else ""
    pairs = []
    for turn in range(count):
        query, reply = messages[2 * turn], messages[2 * turn + 1]
        prompt = ""
        if turn == 0:
            prompt = fill(template.prefix, "", bos_token, eos_token)
            if fold_at is None:
                prompt += system_block
        content = system_block + query["content"] if turn == fold_at else query["content"]
        prompt += fill(template.turn_format(query["role"]), content, bos_token, eos_token)
        reply_text = reply["content"]
        if reply["role"] == "function":  # the calls re-written by the tool format, after any reasoning before them
            thought, calls = thinking.split_thought(template, reply_text)
            reply_text = thought + write_calls(template.tool_format, calls)
        response = fill(template.turn_format(reply["role"]), reply_text, bos_token, eos_token)
        if turn == count - 1:
            response += fill(template.suffix, "", bos_token, eos_token)
        pairs.append((prompt, response))
    return thinking.add_empty_thoughts(template, messages, pairs)
