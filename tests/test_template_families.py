"""The families added in issue 12 against their published chat templates, and reasoning templates'
thinking blocks (enable_thinking, preserve_thinking) against Qwen3's published rendering.

Published templates are given as constants or, when long, as verbatim copies in
tests/data/chat_templates/ (Llama 4's comes with transformers); each names the hub repo it comes from
and where the copy was found. A constant marked "transcribed, not verified against the published file"
was written without a copy of the published file to compare. Templates that follow LlamaFactory's
rendering rather than a published template (gpt_oss, glm4_moe, olmo, hunyuan) are checked against the
text LlamaFactory writes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tasks.templates import configure, encode_pairs, format_pairs, generation_prompt, get_template, supervised_example
from tests.test_template_formats import (
    CHATML,
    CONVERSATION,
    GEMMA3,
    SMOLLM2,
    SYSTEM,
    TOOL_CALL,
    TOOL_CHAT,
    TOOL_CONVERSATION,
    encoded,
    published,
    trained_spans,
)

# Qwen/Qwen3-8B (hybrid thinking), tokenizer_config.json chat_template.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

# Published templates kept verbatim in tests/data/chat_templates/, each named after its hub repo.
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def chat_template(hub_repo: str) -> str:
    return (CHAT_TEMPLATES / (hub_repo.replace("/", "-") + ".jinja")).read_text(encoding="utf-8")


# google/gemma-2-9b-it tokenizer_config.json (refuses a system role). Verified against the copy in
# guidance-ai/guidance's guidance/chat.py ("From https://huggingface.co/google/gemma-2-9b-it/blob/main/
# tokenizer_config.json#L1747") and llama.cpp's models/templates/google-gemma-2-2b-it.jinja (ye-NX/llama.cpp).
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-4-mini-instruct tokenizer_config.json. Verified against a chat-template table in the style
# of guidance's chat.py ("[06/16/25] https://huggingface.co/microsoft/Phi-4-mini-instruct/blob/main/
# tokenizer_config.json#L104"; its repository not confirmed) and a test that copies it "from
# mlx-community/Phi-4-mini-instruct-4bit tokenizer_config.json".
PHI4_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + "
    "'<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# deepseek-ai/deepseek-coder-33b-instruct tokenizer_config.json, as llama.cpp quotes it in
# tests/test-chat-template.cpp (ggml-org/llama.cpp); the 1.3b/6.7b instruct models share the template
# (not verified against their own files). Its generation prompt is '### Response:\n' (the newline before
# the closing endif is not trimmed).
DEEPSEEK_CODER = chat_template("deepseek-ai/deepseek-coder-33b-instruct")

# mistralai/Mistral-Small-3.1-24B-Instruct-2503 tokenizer_config.json, as llama.cpp stores it in
# models/templates/mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja (ggml-org/llama.cpp). Without a
# system message it writes a default system prompt carrying today's date (strftime_now).
MISTRAL_SMALL = chat_template("mistralai/Mistral-Small-3.1-24B-Instruct-2503")
MISTRAL_SMALL_DEFAULT_SYSTEM = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI"

# mistralai/Ministral-8B-Instruct-2410, text-only: the system text joins the last user turn.
# Transcribed, not verified against the published file (no copy of it was found); the same rule as the
# Tekken v3 template llama.cpp quotes for Mistral-Nemo-Instruct-2407.
MINISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST]' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST]' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
)

# ibm-granite/granite-3.0-8b-instruct tokenizer_config.json, as llama.cpp quotes it in
# tests/test-chat-template.cpp (ggml-org/llama.cpp). Granite 3.1+ templates add a dated default system
# prompt when there is no system message; with one they render these same turns.
GRANITE3 = chat_template("ibm-granite/granite-3.0-8b-instruct")

# LGAI-EXAONE/EXAONE-3.5-7.8B-Instruct chat_template, as embedded in the model's GGUF (quoted as ollama's
# library/exaone3.5:7.8b "gguf" template in a stored copy of ollama's template tests, and in projects
# that load EXAONE-3.5 ONNX/HF checkpoints). The hub's tokenizer_config.json itself was not found; its
# repository is not identified for the ollama copy.
EXAONE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '[|system|][|endofturn|]\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

# deepseek-ai/DeepSeek-R1-Distill-Qwen-32B tokenizer_config.json, as llama.cpp stores it in
# models/templates/deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja (ggml-org/llama.cpp): the system text
# after BOS, every reply cut after its '</think>'. DeepSeek-R1's own template (joins several system
# messages with blank lines, otherwise the same text-only rendering) was found only in a blog post.
DEEPSEEK_R1 = chat_template("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B")


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def llama4_template() -> str:
    from transformers.models.llama4.processing_llama4 import chat_template

    return chat_template


QWEN_REPLIES = ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
# (template, published jinja, system prompt, the text trained in each reply); the tiny tokenizer's
# BOS is <|endoftext|> and its EOS <|im_end|>.
FAMILIES = [
    ("qwen3", QWEN3, SYSTEM, ["Hello.<|im_end|>\n", EMPTY_THOUGHT + "4.<|im_end|>\n"]),
    ("qwen3", QWEN3, "", ["Hello.<|im_end|>\n", EMPTY_THOUGHT + "4.<|im_end|>\n"]),  # no default system
    ("qwen3_nothink", CHATML, SYSTEM, QWEN_REPLIES),
    ("smollm2", SMOLLM2, "", QWEN_REPLIES),
    ("gemma3", GEMMA3, SYSTEM, ["Hello.<end_of_turn>\n", "4.<end_of_turn>\n"]),
    ("phi4_mini", PHI4_MINI, SYSTEM, ["Hello.<|end|>", "4.<|end|><|im_end|>"]),  # EOS closes the conversation
    ("deepseekcoder", DEEPSEEK_CODER, SYSTEM, ["Hello.\n<|EOT|>\n", "4.\n<|EOT|>\n"]),
    ("mistral_small", MISTRAL_SMALL, SYSTEM, ["Hello.<|im_end|>", "4.<|im_end|>"]),
    ("ministral", MINISTRAL, "", ["Hello.<|im_end|>", "4.<|im_end|>"]),
    ("granite3", GRANITE3, SYSTEM, ["Hello.<|end_of_text|>\n", "4.<|end_of_text|>\n"]),
    ("exaone", EXAONE, SYSTEM, ["Hello.[|endofturn|]\n", "4.[|endofturn|]\n"]),
    ("exaone", EXAONE, "", ["Hello.[|endofturn|]\n", "4.[|endofturn|]\n"]),  # an empty system block
]


@pytest.mark.parametrize(("name", "jinja", "system", "replies"), FAMILIES,
                         ids=[f"{f[0]}{'-system' if f[2] else ''}" for f in FAMILIES])
def test_new_family_matches_published_chat_template(tokenizer, name, jinja, system, replies):
    input_ids, labels = encoded(tokenizer, name, CONVERSATION, system)
    assert tokenizer.decode(input_ids) == published(tokenizer, jinja, CONVERSATION, system)
    assert trained_spans(tokenizer, input_ids, labels) == replies


def test_gemma2_is_the_published_template_with_eos_trained_after_the_last_reply(tokenizer):
    """LlamaFactory's gemma2 (efficient_eos) appends EOS after the conversation and trains it, so a tuned
    model learns to stop; Gemma 2's published template has no EOS there."""
    input_ids, labels = encoded(tokenizer, "gemma2", CONVERSATION, "")
    assert tokenizer.decode(input_ids) == published(tokenizer, GEMMA2, CONVERSATION, "") + tokenizer.eos_token
    assert trained_spans(tokenizer, input_ids, labels) == ["Hello.<end_of_turn>\n", "4.<end_of_turn>\n<|im_end|>"]


def test_llama4_matches_the_template_transformers_ships(tokenizer):
    input_ids, labels = encoded(tokenizer, "llama4", CONVERSATION, SYSTEM)
    assert tokenizer.decode(input_ids) == published(tokenizer, llama4_template(), CONVERSATION, SYSTEM)
    assert trained_spans(tokenizer, input_ids, labels) == ["Hello.<|eot|>", "4.<|eot|>"]
    pairs = encode_pairs(tokenizer, get_template("llama4"), CONVERSATION, SYSTEM)
    prompt = published(tokenizer, llama4_template(), CONVERSATION[:-1], SYSTEM, generation=True)
    assert tokenizer.decode(generation_prompt(pairs, 4096)) == prompt


def test_mistral_small_writes_no_default_system_where_the_published_template_writes_a_dated_one(tokenizer):
    input_ids, labels = encoded(tokenizer, "mistral_small", CONVERSATION, "")
    text = published(tokenizer, MISTRAL_SMALL, CONVERSATION, "")
    head, _, rest = text.partition("[/SYSTEM_PROMPT]")
    assert head.startswith(tokenizer.bos_token + "[SYSTEM_PROMPT]" + MISTRAL_SMALL_DEFAULT_SYSTEM)
    assert tokenizer.decode(input_ids) == tokenizer.bos_token + rest
    assert trained_spans(tokenizer, input_ids, labels) == ["Hello.<|im_end|>", "4.<|im_end|>"]


def test_deepseekcoder_generation_prompt_ends_with_the_published_newline(tokenizer):
    pairs = encode_pairs(tokenizer, get_template("deepseekcoder"), CONVERSATION, SYSTEM)
    expected = published(tokenizer, DEEPSEEK_CODER, CONVERSATION[:-1], SYSTEM, generation=True)
    assert expected.endswith("### Response:\n")
    assert tokenizer.decode(generation_prompt(pairs, 4096)) == expected
    # Without a system message the published default system prompt is written.
    input_ids, _ = encoded(tokenizer, "deepseekcoder", CONVERSATION, "")
    assert tokenizer.decode(input_ids) == published(tokenizer, DEEPSEEK_CODER, CONVERSATION, "")


def test_ministral_and_mistral_small_generation_prompts_match(tokenizer):
    for name, jinja in (("ministral", MINISTRAL), ("mistral_small", MISTRAL_SMALL)):
        pairs = encode_pairs(tokenizer, get_template(name), CONVERSATION, SYSTEM)
        expected = published(tokenizer, jinja, CONVERSATION[:-1], SYSTEM, generation=True)
        assert tokenizer.decode(generation_prompt(pairs, 4096)) == expected, name


def test_deepseekr1_keeps_the_last_thinking_block_the_published_template_drops(tokenizer):
    thought = "<think>\nAdd them.\n</think>\n\n"
    chat = [*CONVERSATION[:3], {"role": "assistant", "content": thought + "4."}]
    input_ids, labels = encoded(tokenizer, "deepseekr1", chat, SYSTEM)
    text = published(tokenizer, DEEPSEEK_R1, chat, SYSTEM)
    assert text.endswith("<｜Assistant｜>\n\n4.<｜end▁of▁sentence｜>")  # the published rendering cuts at </think>
    assert tokenizer.decode(input_ids) == text.replace("<｜Assistant｜>\n\n4.", "<｜Assistant｜>" + thought + "4.")
    assert trained_spans(tokenizer, input_ids, labels) == ["Hello.<｜end▁of▁sentence｜>",
                                                           thought + "4.<｜end▁of▁sentence｜>"]
    # The generation prompt is the published one up to its opening '<think>\n', which the model writes.
    pairs = encode_pairs(tokenizer, get_template("deepseekr1"), chat, SYSTEM)
    expected = published(tokenizer, DEEPSEEK_R1, chat[:3], SYSTEM, generation=True)
    assert tokenizer.decode(generation_prompt(pairs, 4096)) + "<think>\n" == expected


@pytest.mark.parametrize(("name", "expected", "replies"), [
    ("gpt_oss", "<|start|>system<|message|>Be brief.<|end|><|start|>user<|message|>Hi there<|end|><|start|>assistant"
     "Hello.<|start|>user<|message|>Sum 2+2?<|end|><|start|>assistant<|channel|>analysis<|message|><|end|>"
     "<|start|>assistant<|channel|>final<|message|>4.<|im_end|>",
     ["Hello.", "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>4.<|im_end|>"]),
    ("glm4_moe", "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi there<|assistant|>\nHello.<|user|>\nSum 2+2?"
     "<|assistant|><think>\n\n</think>\n\n\n4.<|im_end|>", ["\nHello.", "<think>\n\n</think>\n\n\n4.<|im_end|>"]),
    ("olmo", "<|im_end|><|user|>\nHi there<|assistant|>\nHello.<|im_end|><|user|>\nSum 2+2?<|assistant|>\n4.<|im_end|>",
     ["Hello.<|im_end|>", "4.<|im_end|>"]),
    ("hunyuan", "<|startoftext|>Be brief.<|extra_4|>Hi there<|extra_0|>Hello.<|eos|>Sum 2+2?<|extra_0|>4.<|eos|>",
     ["Hello.<|eos|>", "4.<|eos|>"]),
])
def test_templates_that_follow_llamafactory_render_as_it_does(tokenizer, name, expected, replies):
    system = "" if name == "olmo" else SYSTEM
    input_ids, labels = encoded(tokenizer, name, CONVERSATION, system)
    assert tokenizer.decode(input_ids) == expected
    assert trained_spans(tokenizer, input_ids, labels) == replies


COT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello."},
    {"role": "user", "content": "Sum 2+2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4."},
]


def qwen3(**options):
    return configure(get_template("qwen3"), **options)


def spans(tokenizer, template, messages, mask_history=False):
    pairs = encode_pairs(tokenizer, template, messages, SYSTEM)
    input_ids, labels = supervised_example(pairs, 4096, train_on_prompt=False, mask_history=mask_history)
    return tokenizer.decode(input_ids), trained_spans(tokenizer, input_ids, labels)


def test_thinking_history_is_dropped_as_qwen3_publishes_and_the_last_block_is_trained(tokenizer):
    text, trained = spans(tokenizer, qwen3(), COT)
    assert text == published(tokenizer, QWEN3, COT, SYSTEM)
    assert trained == ["Hello.<|im_end|>\n", "<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n"]


AGENT_STEP = [  # reasoning before the call, and before the answer to its result
    TOOL_CONVERSATION[0],
    {"role": "function", "content": "<think>\nAsk the tool.\n</think>\n\n" + TOOL_CALL},
    TOOL_CONVERSATION[2],
    {"role": "assistant", "content": "<think>\nRead it out.\n</think>\n\nIt is 18 C."},
]


def test_the_reasoning_of_the_exchange_in_progress_is_kept_and_calls_written_after_it(tokenizer):
    """Qwen3's published template keeps the reasoning of the replies after the last user message (the tool calls
    of the exchange in progress); a call written after its reasoning is still re-written as <tool_call>, as
    LlamaFactory's FunctionFormatter writes it (it was written as the stored JSON)."""
    text, trained = spans(tokenizer, qwen3(), AGENT_STEP)
    chat = [TOOL_CHAT[0], {**TOOL_CHAT[1], "reasoning_content": "Ask the tool."}, TOOL_CHAT[2],
            {"role": "assistant", "content": "It is 18 C.", "reasoning_content": "Read it out."}]
    assert text == published(tokenizer, QWEN3, chat, SYSTEM)
    assert trained == [f"<think>\nAsk the tool.\n</think>\n\n<tool_call>\n{TOOL_CALL}\n</tool_call><|im_end|>\n",
                       "<think>\nRead it out.\n</think>\n\nIt is 18 C.<|im_end|>\n"]
    # a later user message makes it history: its reasoning is dropped, as there
    later = [*AGENT_STEP, {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You're welcome."}]
    text, _ = spans(tokenizer, qwen3(), later)
    chat += [later[4], later[5]]
    assert text == published(tokenizer, QWEN3, chat, SYSTEM) and "Ask the tool." not in text


def test_preserve_thinking_keeps_history_blocks(tokenizer):
    text, trained = spans(tokenizer, qwen3(preserve_thinking=True), COT)
    assert trained == ["<think>\nGreet back.\n</think>\n\nHello.<|im_end|>\n",
                       "<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n"]
    # Without thinking in the data, every reply gets an empty block (LlamaFactory's multi-turn rendering).
    _, trained = spans(tokenizer, qwen3(preserve_thinking=True), CONVERSATION)
    assert trained == [EMPTY_THOUGHT + "Hello.<|im_end|>\n", EMPTY_THOUGHT + "4.<|im_end|>\n"]


def test_enable_thinking_false_drops_thoughts_and_prompts_the_empty_block(tokenizer):
    text, trained = spans(tokenizer, qwen3(enable_thinking=False), COT)
    assert text == published(tokenizer, QWEN3, CONVERSATION, SYSTEM)  # every thought removed, empty block written
    assert trained == QWEN_REPLIES  # ... but not trained on
    pairs = encode_pairs(tokenizer, qwen3(enable_thinking=False), COT, SYSTEM)
    expected = published(tokenizer, QWEN3, COT[:3], SYSTEM, generation=True, enable_thinking=False)
    assert tokenizer.decode(generation_prompt(pairs, 4096)) == expected


def test_mask_history_trains_only_the_last_thinking_reply(tokenizer):
    _, trained = spans(tokenizer, qwen3(), COT, mask_history=True)
    assert trained == ["<think>\nAdd them.\n</think>\n\n4.<|im_end|>\n"]


def test_thinking_options_leave_other_templates_alone():
    assert configure(get_template("qwen3_nothink"), enable_thinking=False) == get_template("qwen3_nothink")
    assert configure(get_template("qwen3"), enable_thinking=False).enable_thinking is False


def test_default_system_and_tool_format_override_the_template(tokenizer):
    template = get_template("llama3", default_system="Be kind.", tool_format="qwen")
    assert template.default_system == "Be kind."
    assert "<tools>" in template.system_with_tools("", '[{"name": "f"}]')
    call = [{"role": "user", "content": "Hi"}, {"role": "function", "content": '{"name": "f", "arguments": {}}'}]
    written = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|eot_id|>'  # closed as a llama3 reply is
    assert format_pairs(template, call, "", "", "")[0][1] == written
    text = tokenizer.decode(encoded(tokenizer, "chatml", CONVERSATION, "")[0])
    configured = configure(get_template("chatml"), default_system="Be kind.")
    pairs = encode_pairs(tokenizer, configured, CONVERSATION, "")
    assert tokenizer.decode([t for p in pairs for part in p for t in part]) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n" + text)


def test_without_a_template_the_tokenizers_own_is_used_else_empty(tokenizer):
    from tasks.core.recipe import Recipe
    from tasks.templates import template_name
    from tasks.templates.choice import TemplateChoice

    data = Recipe.from_flat({}).data
    assert data.template is None  # LlamaFactory's default: no template named
    choice = TemplateChoice.of(data)
    tokenizer.chat_template = None
    assert template_name(None, tokenizer) == "empty" and choice.load(tokenizer).name == "empty"  # as LlamaFactory
    tokenizer.chat_template = CHATML
    assert template_name(None, tokenizer) == "auto" and choice.load(tokenizer).jinja
    assert template_name("llama3", tokenizer) == "llama3"
    assert TemplateChoice.of(data, name="qwen3").enable_thinking is True  # options apply to reasoning templates
    assert choice.enable_thinking is None


@pytest.mark.parametrize("name", ["glm4", "gemma2", "falcon", "gpt_oss", "glm4_moe"])
def test_efficient_eos_templates_learn_to_stop_after_every_reply_and_keep_the_closing_eos(tokenizer, name):
    """LlamaFactory's efficient_eos: a reply ends where the next role token starts, so that token's position is
    labelled EOS (the model learns to stop after every reply, not only the last), and one token is kept for the
    closing EOS, which truncation cut off with the end of the reply."""
    from tasks.encoding import Masking, supervised

    eos = tokenizer.eos_token_id
    row = {"prompt": CONVERSATION[:3], "response": CONVERSATION[3:], "system": "", "tools": ""}
    template = get_template(name)
    encoded_row = supervised(row, tokenizer, template, Masking(cutoff_len=4096))
    input_ids, labels = encoded_row["input_ids"], encoded_row["labels"]
    pairs = encode_pairs(tokenizer, template, CONVERSATION, "")
    second_prompt = len(pairs[0][0]) + len(pairs[0][1])
    assert labels[second_prompt] == eos != input_ids[second_prompt]  # the stop after the first reply
    assert input_ids[-1] == labels[-1] == eos and input_ids.count(eos) == 1  # the closing EOS, once
    assert sum(label == eos for label in labels) == 2
    cut = supervised(row, tokenizer, template, Masking(cutoff_len=len(input_ids) - 3))
    assert cut["input_ids"][-1] == cut["labels"][-1] == eos and len(cut["input_ids"]) == len(input_ids) - 3
    assert supervised(row, tokenizer, template, Masking(cutoff_len=1)) == {"input_ids": [], "labels": []}
    with pytest.raises(RecipeError, match=r"key .train_on_prompt.: template .* \(efficient_eos\)"):
        Recipe.from_flat({"template": name, "train_on_prompt": True, "dataset": "x"})


def test_auto_passes_enable_thinking_false_to_the_chat_template(tokenizer):
    """With no template named, Qwen3's own chat template is used (auto); enable_thinking: false was dropped, so the
    empty thinking block was trained with the reply. Passed to the template, the block ends the (untrained) prompt,
    as LlamaFactory's reasoning template writes it."""
    from tasks.templates.choice import TemplateChoice

    tokenizer.chat_template = QWEN3
    data = Recipe.from_flat({"dataset": "x", "enable_thinking": False}).data
    template = TemplateChoice.of(data).load(tokenizer)
    assert template.jinja and not template.enable_thinking
    pairs = encode_pairs(tokenizer, template, CONVERSATION, SYSTEM)
    input_ids, labels = supervised_example(pairs, 4096, train_on_prompt=False, mask_history=False)
    assert tokenizer.decode(input_ids) == published(tokenizer, QWEN3, CONVERSATION, SYSTEM)
    assert trained_spans(tokenizer, input_ids, labels)[-1] == "4.<|im_end|>\n"  # the empty block is in the prompt
    assert tokenizer.decode(pairs[-1][0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # replies that hold reasoning lose it, as under the named template (the full rendering kept it and the prompt
    # ended with the empty block, so the conversation could not be split turn by turn)
    pairs = encode_pairs(tokenizer, template, COT, SYSTEM)
    input_ids, labels = supervised_example(pairs, 4096, train_on_prompt=False, mask_history=False)
    assert trained_spans(tokenizer, input_ids, labels)[-1] == "4.<|im_end|>\n" and "Add them" not in (
        tokenizer.decode(input_ids))
    default = TemplateChoice.of(Recipe.from_flat({"dataset": "x"}).data)
    assert default.enable_thinking is None  # keys of recipes that leave it alone do not change
    pairs = encode_pairs(tokenizer, default.load(tokenizer), CONVERSATION, SYSTEM)
    input_ids, labels = supervised_example(pairs, 4096, train_on_prompt=False, mask_history=False)
    assert trained_spans(tokenizer, input_ids, labels)[-1] == EMPTY_THOUGHT + "4.<|im_end|>\n"
