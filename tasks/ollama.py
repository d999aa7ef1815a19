"""An Ollama Modelfile for an exported model, as LlamaFactory's export writes one (`Modelfile` beside the
weights: `ollama create NAME -f Modelfile` imports the folder).

The TEMPLATE renders a conversation as the training template writes it (tasks.templates.base.format_pairs, the
same text as the exported Jinja chat template): the prefix, the system block where the family puts it (before
the first turn, or folded into the first or the last user turn), the default system prompt when the request has
none, user, tool-result and assistant turns, and the empty thinking block that ends a generation prompt when
`enable_thinking` is false. It is one line of Go template actions, every literal a quoted string, so no
whitespace next to the text is trimmed or added. Not rendered, as in LlamaFactory's: tool definitions and tool
calls (Ollama passes them as `.Tools` and `.ToolCalls`, which each family writes its own way). The results of
parallel calls differ: training joins them into one observation turn, while Ollama passes each as its own `tool`
message (it merges consecutive messages of other roles only), so each is written as a turn of its own.

The model's own chat template (`auto`) gets no TEMPLATE: Ollama reads the tokenizer's when it imports the folder.
"""

from __future__ import annotations

import json

from tasks.templates.base import Template, fill

CONTEXT = 4096  # LlamaFactory's num_ctx; lower when the model's context is shorter


def literal(text: str) -> str:
    """A Go interpreted string literal (JSON's escapes are Go's; non-ASCII is written as it is, since Go's \\u
    escapes cannot spell a character outside the BMP as JSON does, in two halves)."""
    return json.dumps(text, ensure_ascii=False)


def pieces(fmt: str, content: str, bos_token: str, eos_token: str) -> list[str]:
    """A format string as Go operands: its text (special tokens filled in) quoted, `{content}` as `content`."""
    text = fill(fmt, "\0", bos_token, eos_token)  # NUL marks the slot: no format or special token holds one
    parts = []
    for index, piece in enumerate(text.split("\0")):
        if index:
            parts.append(content)
        if piece:
            parts.append(literal(piece))
    return parts


def written(fmt: str, content: str, bos_token: str, eos_token: str) -> str:
    """Actions that print a format string, its `{content}` the Go expression `content`."""
    return "".join("{{ " + part + " }}" for part in pieces(fmt, content, bos_token, eos_token))


def to_go_template(template: Template, bos_token: str = "", eos_token: str = "") -> str:
    """The Ollama TEMPLATE that writes conversations as `template` does."""
    if template.jinja:
        raise ValueError("template 'auto' is the tokenizer's own chat template: Ollama reads it from the folder")
    actions = ["{{ $system := .System }}"]
    if template.default_system:
        actions.append("{{ if not $system }}{{ $system = " + literal(template.default_system) + " }}{{ end }}")
    written_if = "{{ if true }}" if template.empty_system else "{{ if $system }}"
    text = "{{ $text := $m.Content }}"
    if template.system_in_user:  # folded into one user turn's content: find that message
        block = " ".join(pieces(template.system, "$system", bos_token, eos_token)) or '""'
        actions.append("{{ $block := \"\" }}" + written_if + "{{ $block = print " + block + " }}{{ end }}")
        if template.system_in_user == "first":  # the first turn, whoever opens it
            actions.append("{{ $fold := -1 }}{{ range $i, $m := .Messages }}"
                           "{{ if and (lt $fold 0) (ne $m.Role \"system\") }}{{ $fold = $i }}{{ end }}{{ end }}")
        else:  # the last turn a user (not a tool result) opens, else the last turn
            actions.append("{{ $fold := -1 }}{{ $turn := -1 }}{{ range $i, $m := .Messages }}"
                           "{{ if ne $m.Role \"system\" }}{{ $turn = $i }}{{ end }}"
                           "{{ if eq $m.Role \"user\" }}{{ $fold = $i }}{{ end }}{{ end }}"
                           "{{ if lt $fold 0 }}{{ $fold = $turn }}{{ end }}")
        text += "{{ if eq $i $fold }}{{ $text = print $block $text }}{{ end }}"
        actions.append(written(template.prefix, '""', bos_token, eos_token))
    else:
        actions.append(written(template.prefix, '""', bos_token, eos_token))
        actions.append(written_if + written(template.system, "$system", bos_token, eos_token) + "{{ end }}")
    last = "(eq (len (slice $.Messages $i)) 1)"  # whether message $i is the conversation's last
    suffix = written(template.suffix, '""', bos_token, eos_token)
    actions += [
        "{{ range $i, $m := .Messages }}",
        "{{ if eq $m.Role \"user\" }}" + text + written(template.user, "$text", bos_token, eos_token),
        "{{ else if eq $m.Role \"tool\" }}" + text
        + written(template.turn_format("observation"), "$text", bos_token, eos_token),
        "{{ else if eq $m.Role \"assistant\" }}" + empty_thought(template, last)
        + written(template.assistant, "$m.Content", bos_token, eos_token)
        + ("{{ if " + last + " }}" + suffix + "{{ end }}" if suffix else ""),
        "{{ end }}{{ end }}",
    ]
    if template.thought_words and not template.enable_thinking:  # the generation prompt ends with the empty block
        actions.append("{{ if .Messages }}{{ if ne (index .Messages (len (slice .Messages 1))).Role \"assistant\" }}"
                       "{{ " + literal("".join(template.thought_words)) + " }}{{ end }}{{ end }}")
    return "".join(actions)


def empty_thought(template: Template, last: str) -> str:
    """A reasoning template's empty thinking block before a reply, where the Jinja template writes one: before the
    last reply, or every reply with `preserve_thinking` (Ollama passes a reply's thinking apart, in `.Thinking`,
    so its content holds no block of its own)."""
    if not template.thought_words:
        return ""
    where = "true" if template.preserve_thinking else last
    return "{{ if " + where + " }}{{ " + literal("".join(template.thought_words)) + " }}{{ end }}"


def modelfile(template: Template, tokenizer, stop_ids: list[int], max_positions: int | None) -> str:
    """The Modelfile: FROM the folder it sits in, the TEMPLATE (none for `auto`), a stop parameter per token
    that ends a reply, and the context length."""
    lines = ["# Ollama Modelfile written by TuneFactory's export: ollama create NAME -f Modelfile", "", "FROM .", ""]
    if not template.jinja:
        go = to_go_template(template, tokenizer.bos_token or "", tokenizer.eos_token or "")
        lines += [f'TEMPLATE """{go}"""', ""]
    lines += [f"PARAMETER stop {literal(token)}" for token in tokenizer.convert_ids_to_tokens(stop_ids)]
    lines.append(f"PARAMETER num_ctx {min(CONTEXT, max_positions or CONTEXT)}")
    return "\n".join(lines) + "\n"
