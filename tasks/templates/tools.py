"""Tool formats: how a family lists tool definitions in the system prompt, writes a tool call, and reads one
back from a reply, under LlamaFactory's `tool_format` names (data/tool_utils.py there).

A function turn is stored as JSON: one call as {"name", "arguments"}, parallel calls as a list of them
(tasks.formats.openai). Each format re-writes it as its family does, as LlamaFactory's FunctionFormatter
does: `default` as "Action: / Action Input:" lines, `qwen` one <tool_call> block per call, `llama3` with
"parameters", `mistral` always a list, `glm4` the name then the arguments. A function turn that is not
JSON calls is written as it is (LlamaFactory refuses it). `read` is the inverse, for the API; every
format also accepts a bare JSON call, so a model that answers in another common shape is still read.

The results of parallel calls are one observation turn, joined as LlamaFactory joins them
(RESULTS_SEPARATOR), which is how Qwen's template writes consecutive tool messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.core.errors import DataError

Call = dict[str, Any]  # {"name": str, "arguments": dict}
RESULTS_SEPARATOR = "\n</tool_response>\n<tool_response>\n"

DEFAULT_TOOLS = (
    "{content}\n\nYou have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n```\nAction: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n'
)
QWEN_TOOLS = (
    "{content}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
LLAMA3_TOOLS = (
    "{content}\n\nYou have access to the following functions. To call a function, please respond with JSON for a "
    'function call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\n\n{tool_blocks}"
)
MISTRAL_TOOLS = "[AVAILABLE_TOOLS] {wrapped_tool_list}[/AVAILABLE_TOOLS]{content}"
GLM4_TOOLS = (  # LlamaFactory writes GLM-4's tool prompt right after the system text
    "{content}你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text_glm4}"
)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def calls_text(calls: list[Call]) -> str:
    """A function turn as stored: one call as its {"name", "arguments"} object, parallel calls as a list of them
    (the dataset converter and the API both write it, so serving sees what training saw)."""
    return dumps(calls[0] if len(calls) == 1 else calls)


def results_text(results: list[str]) -> str:
    """The observation turn answering parallel calls, as stored: their results joined as LlamaFactory joins
    them, so a Qwen template writes one <tool_response> block each, as Qwen's own template does."""
    return RESULTS_SEPARATOR.join(results)


def stored_calls(content: str) -> list[Call] | None:
    """The calls of a stored function turn ({"name", "arguments"} or a list of them), or None if it is not that."""
    try:
        value = json.loads(content)
    except ValueError:
        return None
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return None
    return [{"name": c["name"], "arguments": c.get("arguments", c.get("parameters", {}))} for c in calls]


def json_calls(text: str) -> list[Call] | None:
    """Calls written as bare JSON (an object or a list; "arguments" or "parameters"), or None."""
    text = text.strip()
    return stored_calls(text) if text[:1] in ("{", "[") else None


def tagged_calls(text: str) -> list[Call] | None:
    """Calls in <tool_call> blocks (each one call, or a list of them), or None."""
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    calls = [json_calls(block) for block in blocks]
    return [c for found in calls for c in found] if blocks and all(calls) else None


def action_calls(text: str) -> list[Call] | None:
    """LlamaFactory's default format ("Action: name" / "Action Input: {json}" per call), or None."""
    found = re.findall(r"Action:\s*([a-zA-Z0-9_]+)\s*Action Input:\s*(.+?)(?=\s*Action:|\s*$)", text, re.DOTALL)
    calls = []
    for name, arguments in found:
        try:
            calls.append({"name": name.strip(), "arguments": json.loads(arguments.strip().strip('"`'))})
        except ValueError:
            return None
    return calls or None


def glm4_calls(text: str) -> list[Call] | None:
    """GLM-4's call (the name, a newline, the JSON arguments), or None."""
    name, _, arguments = text.strip().partition("\n")
    try:
        return [{"name": name.strip(), "arguments": json.loads(arguments)}] if name.strip() and arguments else None
    except ValueError:
        return None


def write_glm4(calls: list[Call]) -> str:
    if len(calls) > 1:  # as LlamaFactory refuses them
        raise DataError("a function turn holds parallel tool calls; the glm4 tool format writes one call per turn")
    return f"{calls[0]['name']}\n{dumps(calls[0]['arguments'])}"


@dataclass(frozen=True)
class ToolFormat:
    tools: str  # system prompt with tools: {content} system text; {tools} one OpenAI-wrapped JSON per line;
    # {tool_blocks} each wrapped one indented, as Llama 3.1 writes them; {wrapped_tool_list} / {tool_list} a JSON
    # array of the wrapped / bare definitions; {tool_text} / {tool_names} LlamaFactory's default description and
    # name list; {tool_text_glm4} GLM-4's
    write: Callable[[list[Call]], str]  # a function turn's calls as this family writes them
    read: Callable[[str], list[Call] | None]  # the inverse: the calls in a reply, or None
    # The same writing in Jinja, for exported chat templates (tasks.templates.jinja): one call as an expression
    # of `name` and `arguments` (JSON text), the separator between calls, and "[...]" around several / all.
    jinja_call: str
    jinja_separator: str = "\n"
    jinja_brackets: str = ""  # "", "several" or "always"


TOOL_FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat(
        DEFAULT_TOOLS,
        lambda calls: "\n".join(f"Action: {c['name']}\nAction Input: {dumps(c['arguments'])}" for c in calls),
        action_calls,
        "'Action: ' ~ name ~ '\\nAction Input: ' ~ arguments",
    ),
    "qwen": ToolFormat(
        QWEN_TOOLS,
        lambda calls: "\n".join(f"<tool_call>\n{dumps({'name': c['name'], 'arguments': c['arguments']})}\n</tool_call>"
                                for c in calls),
        tagged_calls,
        "'<tool_call>\\n{\"name\": ' ~ (name | tojson) ~ ', \"arguments\": ' ~ arguments ~ '}\\n</tool_call>'",
    ),
    "llama3": ToolFormat(
        LLAMA3_TOOLS,
        lambda calls: dumps([{"name": c["name"], "parameters": c["arguments"]} for c in calls] if len(calls) > 1
                            else {"name": calls[0]["name"], "parameters": calls[0]["arguments"]}),
        json_calls,
        "'{\"name\": ' ~ (name | tojson) ~ ', \"parameters\": ' ~ arguments ~ '}'",
        ", ",
        "several",
    ),
    "mistral": ToolFormat(
        MISTRAL_TOOLS,
        lambda calls: dumps([{"name": c["name"], "arguments": c["arguments"]} for c in calls]),
        json_calls,
        "'{\"name\": ' ~ (name | tojson) ~ ', \"arguments\": ' ~ arguments ~ '}'",
        ", ",
        "always",
    ),
    "glm4": ToolFormat(GLM4_TOOLS, write_glm4, glm4_calls, "name ~ '\\n' ~ arguments"),
}


def described(tool: dict[str, Any]) -> str:
    """One tool as LlamaFactory's default format describes it (DefaultToolUtils.tool_formatter)."""
    parameters = tool.get("parameters") or {}
    lines = ""
    for name, param in (parameters.get("properties") or {}).items():
        required = ", required" if name in parameters.get("required", []) else ""
        enum = ", should be one of [{}]".format(", ".join(map(str, param["enum"]))) if param.get("enum") else ""
        items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
        lines += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
    return (f"> Tool Name: {tool.get('name', '')}\nTool Description: {tool.get('description', '')}\n"
            f"Tool Args:\n{lines}\n")


def bare_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool definitions bare ({"name", ...}), whether they came so or OpenAI-wrapped ({"type": "function", ...})."""
    return [tool.get("function", tool) if tool.get("type") == "function" else tool for tool in tools]


def describe(tools: list[dict[str, Any]]) -> dict[str, str]:
    """The placeholders of a tools pattern filled from the definitions. Datasets hold them bare ({"name", ...}),
    OpenAI clients send them wrapped ({"type": "function", "function": {...}}): each placeholder writes one
    shape whichever came, as LlamaFactory's tool formatters do, so serving writes what training wrote."""
    bare = bare_tools(tools)
    wrapped = [{"type": "function", "function": tool} for tool in bare]
    glm4 = "".join(f"\n\n## {tool.get('name', '')}\n\n{json.dumps(tool, indent=4, ensure_ascii=False)}\n"
                   "在调用上述函数时，请使用 Json 格式表示调用的参数。" for tool in bare)
    return {"tools": "\n".join(dumps(tool) for tool in wrapped),
            "tool_blocks": "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in wrapped),
            "wrapped_tool_list": dumps(wrapped), "tool_list": dumps(bare),
            "tool_text": "".join(described(tool) for tool in bare),
            "tool_names": ", ".join(str(tool.get("name", "")) for tool in bare), "tool_text_glm4": glm4}


def fill_tools(pattern: str, system: str, tools: list[dict[str, Any]]) -> str:
    """The system prompt with the tool definitions written in by a tools pattern."""
    values = {"content": system, **describe(tools)}
    filled = re.sub(r"\{(" + "|".join(values) + r")\}", lambda m: values[m.group(1)], pattern)
    return filled if system else filled.lstrip("\n")


def write_calls(tool_format: str, content: str) -> str:
    """A stored function turn as the tool format writes it (as stored when it is not JSON calls)."""
    calls = stored_calls(content)
    return TOOL_FORMATS[tool_format].write(calls) if calls else content


def read_calls(tool_format: str, text: str) -> list[Call] | None:
    """The calls in a generated reply: the format's own way of writing them, or a bare JSON call."""
    return TOOL_FORMATS[tool_format].read(text) or json_calls(text) or tagged_calls(text)
