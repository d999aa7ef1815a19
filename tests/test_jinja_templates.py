"""Each named template as a Jinja chat template renders exactly what training encodes."""

import json

import pytest
from transformers import AutoTokenizer

from tasks.templates import TEMPLATES, format_pairs
from tasks.templates.jinja import to_jinja

NAMED = sorted(name for name, template in TEMPLATES.items() if not template.jinja)
CONVERSATION = [
    {"role": "user", "content": "Hi {there}, what's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And \"3+3\"?\nThanks"},
    {"role": "assistant", "content": "6, of course."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("system", ["", "Be brief."])
def test_rendering_matches_training_text(tokenizer, name, system):
    template = TEMPLATES[name]
    tokenizer.chat_template = to_jinja(template)
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    pairs = format_pairs(template, CONVERSATION, system, tokenizer.bos_token, tokenizer.eos_token)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "".join(p + r for p, r in pairs)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == "".join(p + r for p, r in pairs[:-1]) + pairs[-1][0]  # ends with the assistant header


COT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nAdd.\n</think>\n\n4."},
]


@pytest.mark.parametrize("options", [{}, {"enable_thinking": False}, {"preserve_thinking": True}],
                         ids=["default", "no-thinking", "preserve"])
@pytest.mark.parametrize("name", ["qwen3", "deepseekr1", "glm4_moe", "gpt_oss"])
def test_reasoning_templates_render_thinking_as_training_does(tokenizer, name, options):
    from tasks.templates import configure

    template = configure(TEMPLATES[name], **options)
    tokenizer.chat_template = to_jinja(template)
    for conversation in (COT, CONVERSATION):
        pairs = format_pairs(template, conversation, "", tokenizer.bos_token, tokenizer.eos_token)
        assert tokenizer.apply_chat_template(conversation, tokenize=False) == "".join(p + r for p, r in pairs)
    # A generation prompt: the earlier turns as history, then the prompt (with the empty block when thinking is off).
    pairs = format_pairs(template, COT, "", tokenizer.bos_token, tokenizer.eos_token)
    expected = "".join(p + r for p, r in pairs[:-1]) + pairs[-1][0]
    assert tokenizer.apply_chat_template(COT[:3], tokenize=False) == expected


@pytest.mark.parametrize("name", ["qwen3", "deepseekr1", "glm4_moe", "gpt_oss"])
def test_reasoning_before_a_tool_call_is_written_as_training_writes_it(tokenizer, name):
    """The reasoning of the exchange in progress is kept, a call's included (its content in OpenAI messages)."""
    template = TEMPLATES[name]
    tokenizer.chat_template = to_jinja(template)
    opening, closing = template.thought_words
    thought = f"{opening}Ask the tool.{closing}"
    stored, openai = tool_conversation(CALLS[:1])
    stored[1] = {**stored[1], "content": thought + stored[1]["content"]}
    openai[1] = {**openai[1], "content": thought}
    pairs = format_pairs(template, stored, "", tokenizer.bos_token, tokenizer.eos_token)
    rendered = tokenizer.apply_chat_template(openai, tokenize=False)
    assert rendered == "".join(p + r for p, r in pairs) and "Ask the tool." in rendered


CALLS = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]
RESULTS = ['{"temperature": 18}', "noon"]


def tool_conversation(calls: list[dict]) -> tuple[list[dict], list[dict]]:
    """A conversation with (parallel) tool calls and their results: as training stores it, and as OpenAI messages."""
    from tasks.templates.tools import calls_text, results_text

    stored = [{"role": "user", "content": "Weather and time in Paris?"},
              {"role": "function", "content": calls_text(calls)},
              {"role": "observation", "content": results_text(RESULTS[: len(calls)])},
              {"role": "assistant", "content": "18 C at noon."}]
    openai = [stored[0],
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": f"c{i}", "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                  for i, c in enumerate(calls)]},
              *[{"role": "tool", "tool_call_id": f"c{i}", "content": r} for i, r in enumerate(RESULTS[: len(calls)])],
              stored[3]]
    return stored, openai


@pytest.mark.parametrize("name", NAMED)
def test_exported_template_writes_openai_tool_calls_and_results_as_training_does(tokenizer, name):
    """An exported model served with OpenAI messages sees its tool calls written by the template's tool format
    (Qwen's <tool_call> blocks, Llama 3.1's "parameters", Mistral's list, ...) and parallel results joined."""
    template = TEMPLATES[name]
    tokenizer.chat_template = to_jinja(template)
    stored, openai = tool_conversation(CALLS if template.tool_format != "glm4" else CALLS[:1])
    pairs = format_pairs(template, stored, "Be brief.", tokenizer.bos_token, tokenizer.eos_token)
    messages = [{"role": "system", "content": "Be brief."}, *openai]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "".join(p + r for p, r in pairs)
    # OpenAI clients send arguments as JSON text: written as sent
    for call in messages[2]["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    as_text = messages
    assert tokenizer.apply_chat_template(as_text, tokenize=False) == "".join(p + r for p, r in pairs)
