"""Chat templates as data, and the pure functions that turn a conversation into tokens and labels.

A format string holds `{content}`, and may hold `{bos_token}` / `{eos_token}`, which are filled
from the tokenizer. Content is substituted literally, so braces in user text are safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.core.errors import RecipeError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Template:
    name: str
    user: str  # one user turn, ending where the assistant's reply starts
    assistant: str  # one assistant reply, including whatever closes the turn
    system: str = "{content}"
    default_system: str = ""
    prefix: str = ""  # before the first turn (BOS for some families)
    stop_words: tuple[str, ...] = ()


def _chatml(name: str, default_system: str = "") -> Template:
    return Template(
        name=name,
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system=default_system,
        stop_words=("<|im_end|>",),
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(name="empty", user="{content}", assistant="{content}"),
        Template(
            name="default",
            system="System: {content}\n",
            user="Human: {content}\nAssistant: ",
            assistant="{content}{eos_token}\n",
        ),
        Template(
            name="alpaca",
            user="### Instruction:\n{content}\n\n### Response:\n",
            assistant="{content}{eos_token}\n\n",
            default_system="Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n",
        ),
        Template(
            name="vicuna",
            user="USER: {content} ASSISTANT: ",
            assistant="{content}{eos_token}",
            system="{content} ",
            default_system="A chat between a curious user and an artificial intelligence assistant. The assistant "
            "gives helpful, detailed, and polite answers to the user's questions.",
        ),
        _chatml("chatml"),
        _chatml("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        _chatml("smollm", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        Template(
            name="llama3",
            prefix="{bos_token}",
            system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
            user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant="{content}<|eot_id|>",
            stop_words=("<|eot_id|>",),
        ),
    ]
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise RecipeError(f"key 'template': unknown template '{name}' (known: {', '.join(sorted(TEMPLATES))})")
    return TEMPLATES[name]


def render(fmt: str, content: str, tokenizer) -> str:
    """Fill a format string; special tokens first, then the content taken literally."""
    fmt = fmt.replace("{bos_token}", tokenizer.bos_token or "").replace("{eos_token}", tokenizer.eos_token or "")
    return fmt.replace("{content}", content)


def encode_pairs(tokenizer, template: Template, messages: list[dict], system: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per user/assistant exchange; system and prefix go before the first."""
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    pairs = []
    for index in range(0, len(messages) - 1, 2):
        prompt = ""
        if index == 0:
            prompt = render(template.prefix, "", tokenizer)
            system_text = system or template.default_system
            if system_text:
                prompt += render(template.system, system_text, tokenizer)
        prompt += render(template.user, messages[index]["content"], tokenizer)
        reply = render(template.assistant, messages[index + 1]["content"], tokenizer)
        pairs.append((encode(prompt), encode(reply)))
    return pairs


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """Truncated (source, target) lengths within cutoff_len, keeping both in proportion (as LlamaFactory)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * target_len / (source_len + target_len))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def supervised_example(
    pairs: list[tuple[list[int], list[int]]], cutoff_len: int, train_on_prompt: bool, mask_history: bool
) -> tuple[list[int], list[int]]:
    """input_ids and labels (IGNORE_INDEX where no loss is taken) for one conversation."""
    input_ids: list[int] = []
    labels: list[int] = []
    for turn, (source, target) in enumerate(pairs):
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), budget)
        source, target = source[:source_len], target[:target_len]
        is_history = turn != len(pairs) - 1
        input_ids += source + target
        labels += source if train_on_prompt else [IGNORE_INDEX] * len(source)
        labels += [IGNORE_INDEX] * len(target) if (mask_history and is_history) else target
    return input_ids, labels


def generation_prompt(pairs: list[tuple[list[int], list[int]]], cutoff_len: int) -> list[int]:
    """Prompt ids for generating the last reply: earlier exchanges plus the last prompt."""
    history = [token for source, target in pairs[:-1] for token in source + target]
    source, target = pairs[-1]
    source_len, _ = infer_seqlen(len(history) + len(source), len(target), cutoff_len)
    return (history + source)[:source_len]


def stop_token_ids(tokenizer, template: Template) -> list[int]:
    """Token ids that end an assistant reply: EOS plus the template's stop words."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for word in template.stop_words:
        token = tokenizer.convert_tokens_to_ids(word)
        if token is not None and token != tokenizer.unk_token_id:
            ids.add(token)
    return sorted(ids)
