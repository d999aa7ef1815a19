"""Each named template as a Jinja chat template renders exactly what training encodes."""

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
