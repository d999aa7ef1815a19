"""A named template written out as a Jinja chat template, so an exported model's tokenizer renders with
`apply_chat_template` exactly the text the model was trained on (tasks.templates.base.format_pairs).

Messages: an optional leading system message, then turns alternating user-side (user; tool results,
consecutive ones joined as one turn) and assistant-side (assistant, with OpenAI `tool_calls` written by
the template's tool format). A user turn already ends with the assistant's header, so a conversation
ending on the user side is the generation prompt; `add_generation_prompt` adds nothing. Tool
definitions are not rendered here (write them into the system message, as `system_with_tools` does).
"""

from __future__ import annotations

import json
import re

from tasks.templates.base import Template
from tasks.templates.tools import RESULTS_SEPARATOR, TOOL_FORMATS

PLACEHOLDER = re.compile(r"\{(content|bos_token|eos_token)\}")


def expression(fmt: str, content: str) -> str:
    """A format string as a Jinja expression concatenating literals, `content` and the special tokens."""
    parts = []
    for index, piece in enumerate(PLACEHOLDER.split(fmt)):
        if index % 2 == 0:
            if piece:
                parts.append(json.dumps(piece))
        else:
            parts.append(content if piece == "content" else piece)
    return "(" + " ~ ".join(parts or ['""']) + ")"


def to_jinja(template: Template) -> str:
    """The Jinja chat template that renders conversations as `template` does."""
    if template.jinja:
        raise ValueError("template 'auto' is the tokenizer's own chat template already")
    turns = {role: expression(template.turn_format(role), "text") for role in ("user", "observation", "assistant",
                                                                               "function")}
    system_block = expression(template.system, "system")
    fold = {"": "-1", "first": "0", "last": "last_exchange"}[template.system_in_user]
    return "".join([
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}",
        "{%- else -%}",
        f"{{%- set system = {json.dumps(template.default_system)} -%}}{{%- set turns = messages -%}}",
        "{%- endif -%}",
        *merge_tool_results(),
        # the system block of a "last" template goes in the last turn a user (not a tool result) opens
        "{%- set found = namespace(last_user=(turns | length) - 1) -%}",
        "{%- for message in turns -%}{%- if message['role'] == 'user' -%}{%- set found.last_user = loop.index0 -%}",
        "{%- endif -%}{%- endfor -%}",
        "{%- set last_exchange = found.last_user // 2 -%}",
        f"{{%- set block = {system_block} if system {'or true ' if template.empty_system else ''}else '' -%}}",
        f"{{{{- {expression(template.prefix, '')} -}}}}",
        f"{{%- if {fold} < 0 -%}}{{{{- block -}}}}{{%- endif -%}}",
        "{%- for message in turns -%}",
        "{%- set role = message['role'] -%}",
        "{%- set text = message['content'] or '' -%}",
        "{%- if role in ['user', 'tool', 'observation'] -%}",
        f"{{%- if loop.index0 // 2 == {fold} -%}}{{%- set text = block ~ text -%}}{{%- endif -%}}",
        "{%- if role == 'user' -%}",
        f"{{{{- {turns['user']} -}}}}",
        "{%- else -%}",
        f"{{{{- {turns['observation']} -}}}}",
        "{%- endif -%}",
        "{%- else -%}",
        *thinking(template),
        "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}",
        *written_calls(template),
        f"{{{{- {turns['function']} -}}}}",
        "{%- else -%}",
        f"{{{{- {turns['assistant']} -}}}}",
        "{%- endif -%}",
        "{%- endif -%}",
        f"{{%- if loop.last and role == 'assistant' -%}}{{{{- {expression(template.suffix, '')} -}}}}"
        "{%- endif -%}",
        "{%- endfor -%}",
        *thinking_prompt(template),
    ])


def merge_tool_results() -> list[str]:
    """Consecutive tool messages (results of parallel calls) as one turn, joined as training joins them."""
    return [
        "{%- set merged = namespace(turns=[]) -%}",
        "{%- for message in turns -%}",
        "{%- if message['role'] in ['tool', 'observation'] and merged.turns",
        " and merged.turns[-1]['role'] in ['tool', 'observation'] -%}",
        "{%- set merged.turns = merged.turns[:-1] + [{'role': 'tool', 'content': merged.turns[-1]['content'] ~ "
        f"{json.dumps(RESULTS_SEPARATOR)} ~ message['content']}}] -%}}",
        "{%- else -%}{%- set merged.turns = merged.turns + [message] -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- set turns = merged.turns -%}",
    ]


def written_calls(template: Template) -> list[str]:
    """`text` set to an assistant message's OpenAI tool_calls as the template's tool format writes them
    (tasks.templates.tools.write_calls), after the reasoning block its content holds, if any (a reasoning
    template keeps it as for a reply); arguments given as JSON text are written as they are."""
    tool_format = TOOL_FORMATS[template.tool_format]
    brackets = {"": "false", "several": "message['tool_calls'] | length > 1", "always": "true"}
    thought = []
    if template.thought_words:
        closing = template.thought_words[1]
        mark = closing.strip()
        after = closing[closing.index(mark) + len(mark):]  # what the closing word writes after its tag
        thought = [f"{{%- set reasoning = text.split({json.dumps(mark)})[0] ~ {json.dumps(mark + after)} "
                   f"if {json.dumps(mark)} in text else '' -%}}"]
    return [
        *thought,
        "{%- set calls = namespace(written=[]) -%}",
        "{%- for call in message['tool_calls'] -%}",
        "{%- set function = call['function'] if call['function'] is defined else call -%}",
        "{%- set name = function['name'] -%}",
        "{%- set arguments = function['arguments'] if function['arguments'] is string"
        " else function['arguments'] | tojson -%}",
        f"{{%- set calls.written = calls.written + [{tool_format.jinja_call}] -%}}",
        "{%- endfor -%}",
        f"{{%- set text = calls.written | join({json.dumps(tool_format.jinja_separator)}) -%}}",
        f"{{%- if {brackets[tool_format.jinja_brackets]} -%}}{{%- set text = '[' ~ text ~ ']' -%}}{{%- endif -%}}",
        *(["{%- set text = reasoning ~ text -%}"] if thought else []),
    ]


def thinking(template: Template) -> list[str]:
    """A reply's thinking block as tasks.templates.thinking writes it: dropped where the options drop it,
    an empty block before a reply that needs one (set up in `text`, the reply's content)."""
    if not template.thought_words:
        return []
    opening, closing = (json.dumps(word.strip()) for word in template.thought_words)
    history = "loop.index0 < found.last_user and not loop.last"  # before the last user message: dropped
    drop = "true" if not template.enable_thinking else "false" if template.preserve_thinking else history
    every = "true" if template.preserve_thinking else "loop.last"
    return [
        f"{{%- if ({drop}) and {closing} in text -%}}{{%- set text = text.split({closing})[-1].lstrip('\\n') -%}}"
        "{%- endif -%}",
        f"{{%- if ({every}) and not ({opening} in text or {closing} in text) -%}}"
        f"{{{{- {json.dumps(''.join(template.thought_words))} -}}}}{{%- endif -%}}",
    ]


def thinking_prompt(template: Template) -> list[str]:
    """With enable_thinking false, a generation prompt ends with the empty block (the model answers after it)."""
    if not template.thought_words or template.enable_thinking:
        return []
    return ["{%- if turns and turns[-1]['role'] in ['user', 'tool', 'observation'] -%}"
            f"{{{{- {json.dumps(''.join(template.thought_words))} -}}}}{{%- endif -%}}"]
