"""`tool_format`: how tool definitions join the system prompt and how a tool call is written, borrowed by
any template, under LlamaFactory's tool format names. The tool lists follow the families' prompts; a call
is written as the dataset stores it (JSON with "name" and "arguments"), wrapped as the family wraps calls,
not re-keyed or re-rendered as LlamaFactory's formatters do (its llama3 writes "parameters", its default
"Action: / Action Input:" lines). A call is written inside the template's own reply format, so it closes
the turn as a reply does."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.templates.families.chatml import QWEN_TOOLS


@dataclass(frozen=True)
class ToolFormat:
    tools: str  # {content}: the system text, {tools}: one JSON tool definition per line, {tool_list}: a JSON array
    call: str  # the call as the dataset stores it ({content}), wrapped as this format writes it


LLAMA3_TOOLS = (
    "{content}\n\nYou have access to the following functions. To call a function, please respond with JSON for a "
    'function call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\n\n{tools}"
)
TOOL_FORMATS = {
    "default": ToolFormat("{content}\n\nYou have access to the following tools:\n{tools}", "{content}"),
    "qwen": ToolFormat(QWEN_TOOLS, "<tool_call>\n{content}\n</tool_call>"),
    "llama3": ToolFormat(LLAMA3_TOOLS, "{content}"),
    "mistral": ToolFormat("[AVAILABLE_TOOLS] {tool_list}[/AVAILABLE_TOOLS]{content}", "[TOOL_CALLS] {content}"),
}
