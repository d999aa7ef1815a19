"""Qwen3 and Qwen3.5: ChatML turns, Qwen's tool tags, and thinking blocks in the reasoning variants.

No default system prompt (Qwen2.5 had one). `qwen3` / `qwen3_5` are reasoning templates: the last
reply opens with '<think>\\n...\\n</think>\\n\\n', replies in history are written without it, as
Qwen/Qwen3-8B's published template renders a conversation (see tasks.templates.thinking for
enable_thinking / preserve_thinking). The `_nothink` variants are the instruct models' plain ChatML
(Qwen3-*-Instruct-2507). Qwen3.5's published tool calls are XML (<function=...>); tool calls are
written here in Qwen2.5's JSON <tool_call> blocks.

`qwen3_5` / `qwen3_5_nothink` follow LlamaFactory's qwen3_5 templates and Qwen3's rendering; they are
not verified against Qwen3.5's published chat_template.jinja (no copy of it was found to compare).
"""

from tasks.templates.families.chatml import QWEN_OBSERVATION, chatml

THOUGHT = ("<think>\n", "\n</think>\n\n")
TOOLS = {"observation": QWEN_OBSERVATION, "tool_format": "qwen"}

TEMPLATES = [
    chatml("qwen3", "Qwen3 (hybrid thinking): ChatML, <think> blocks, <tool_call> tools", thought_words=THOUGHT,
           **TOOLS),
    chatml("qwen3_nothink", "Qwen3 instruct (2507) / Qwen3 without thinking: ChatML, <tool_call> tools", **TOOLS),
    chatml("qwen3_5", "Qwen3.5 (thinking): ChatML, <think> blocks", thought_words=THOUGHT, **TOOLS),
    chatml("qwen3_5_nothink", "Qwen3.5 without thinking: ChatML", **TOOLS),
]
