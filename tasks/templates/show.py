"""A fixed sample conversation rendered with a template, trained spans marked ⟦like this⟧."""

from __future__ import annotations

import json
from itertools import groupby

from tasks.core.errors import RecipeError, did_you_mean
from tasks.templates.base import IGNORE_INDEX, Template, format_pairs
from tasks.templates.encode import encode_pairs, supervised_example
from tasks.templates.registry import TEMPLATES, get_template
from tasks.templates.tools import TOOL_FORMATS, calls_text, results_text

SAMPLE_SYSTEM = "You are a concise assistant."
SAMPLE = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "8."},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
CALLS = [{"name": "get_weather", "arguments": {"city": city}} for city in ("Paris", "Lyon")]
TOOL_SAMPLE = [
    {"role": "user", "content": "Weather in Paris and Lyon?"},
    {"role": "function", "content": calls_text(CALLS)},
    {"role": "observation", "content": results_text(['{"celsius": 18}', '{"celsius": 21}'])},
    {"role": "assistant", "content": "18 C in Paris, 21 C in Lyon."},
]
OPEN, CLOSE = "⟦", "⟧"


def mark(text: str, trained: bool) -> str:
    """Text wrapped in the trained-span marks when trained."""
    return f"{OPEN}{text}{CLOSE}" if trained else text


def tool_sample(template: Template) -> tuple[list[dict], str]:
    """(messages, system prompt) of a tool-use sample: a tool listed, calls made (one for formats that write
    one call a turn), their results, a reply."""
    messages = TOOL_SAMPLE
    if template.tool_format == "glm4":
        messages = [TOOL_SAMPLE[0], {"role": "function", "content": calls_text(CALLS[:1])},
                    {"role": "observation", "content": '{"celsius": 18}'}, {"role": "assistant", "content": "18 C."}]
    return messages, template.system_with_tools(SAMPLE_SYSTEM, json.dumps([WEATHER]))


def render_sample(name: str, tokenizer=None, tools: bool = False, tool_format: str | None = None) -> str:
    """The sample rendered with template name (with tools: the tool-use sample, in tool_format if given);
    with a tokenizer the marks follow the real label mask, without one the text is written with placeholder
    <bos>/<eos> (auto needs a tokenizer)."""
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        raise RecipeError(f"--tool-format {tool_format}: not a tool format ({', '.join(TOOL_FORMATS)})"
                          f"{did_you_mean(tool_format, TOOL_FORMATS)}")
    template = get_template(name, tool_format=tool_format)
    messages, system = tool_sample(template) if tools else (SAMPLE, SAMPLE_SYSTEM)
    if tokenizer is None:
        if template.jinja:
            raise RecipeError("template 'auto' renders with a model's own chat_template: name a model to show it")
        pairs = format_pairs(template, messages, system, "<bos>", "<eos>")
        return "".join(mark(prompt, False) + mark(response, True) for prompt, response in pairs)
    pairs = encode_pairs(tokenizer, template, messages, system)
    input_ids, labels = supervised_example(pairs, cutoff_len=1 << 30, train_on_prompt=False, mask_history=False,
                                           efficient_eos=tokenizer.eos_token_id if template.efficient_eos else None)
    return mark_trained(tokenizer, input_ids, labels)


def mark_trained(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """Decoded tokens with the runs that carry loss wrapped in ⟦ ⟧. A position labelled with another token than its
    own (an efficient_eos template's stop, learnt where the next prompt starts) shows that label in ⟦ ⟧ before it."""
    kinds = ["prompt" if label == IGNORE_INDEX else "trained" if label == token else "other"
             for token, label in zip(input_ids, labels, strict=True)]
    # Decode growing prefixes and cut the differences, so spaces a tokenizer folds into a token stay visible.
    shown, text, end = [], "", 0
    for kind, run in groupby(kinds):
        start, end = end, end + len(list(run))
        if kind == "other":
            shown.append(mark(tokenizer.decode(labels[start:end], clean_up_tokenization_spaces=False), True))
        longer = tokenizer.decode(input_ids[:end], clean_up_tokenization_spaces=False)
        shown.append(mark(longer[len(text) :], kind == "trained"))
        text = longer
    return "".join(shown)


def list_templates() -> list[tuple[str, str]]:
    """(name, one-line description) of every template, sorted by name."""
    return [(name, template.description) for name, template in sorted(TEMPLATES.items())]
