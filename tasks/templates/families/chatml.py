"""ChatML ('<|im_start|>role\\n ... <|im_end|>\\n') and the families that use it as is."""

from tasks.templates.base import Template

SYSTEM = "<|im_start|>system\n{content}<|im_end|>\n"
USER = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
ASSISTANT = "{content}<|im_end|>\n"
TOOL = "<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n"
# Qwen2.5's tool turns: results go back in a user turn, each call is JSON in its own <tool_call> block
# (written by the qwen tool format).
QWEN_OBSERVATION = "<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def chatml(name: str, description: str, **fields) -> Template:
    """A ChatML template; fields override the shared formats."""
    formats = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "observation": TOOL,
               "stop_words": ("<|im_end|>",)}
    return Template(name=name, description=description, **{**formats, **fields})


TEMPLATES = [
    chatml("chatml", "ChatML with no default system prompt (OpenHermes, Dolphin, ...)",
           stop_words=("<|im_end|>", "<|im_start|>")),  # as LlamaFactory's chatml: a new turn also ends a reply
    chatml(
        "qwen",
        "Qwen2.5 (ChatML, Qwen's default system prompt, <tool_call> tools)",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        observation=QWEN_OBSERVATION,
        tool_format="qwen",
    ),
    chatml(
        "qwen2",
        "Qwen2 / Qwen1.5 (ChatML, 'You are a helpful assistant.')",
        default_system="You are a helpful assistant.",
        observation=QWEN_OBSERVATION,
        tool_format="qwen",
    ),
    chatml("smollm", "SmolLM (ChatML, no default system prompt, as LlamaFactory's smollm)"),
    chatml("yi", "Yi / Yi-1.5 chat (ChatML)"),
    chatml("intern2", "InternLM2 / 2.5 chat (ChatML after BOS)", prefix="{bos_token}"),
    chatml(
        "smollm2",
        "SmolLM2 (ChatML with SmolLM2's published default system prompt)",
        default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    ),
]
