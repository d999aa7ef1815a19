"""Named templates against each family's published jinja chat_template, and `template: auto`.

Each constant below is a chat_template as published in the family's tokenizer_config.json. The tiny
tokenizer only knows the ChatML special tokens, so other families' control tokens are plain text to
it; byte-level BPE decodes that text exactly, so comparing decoded text is exact.
"""

from __future__ import annotations

import json

import pytest

from tasks.core.errors import RecipeError
from tasks.templates import (
    IGNORE_INDEX,
    encode_pairs,
    generation_prompt,
    get_template,
    stop_token_ids,
    supervised_example,
)

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-2-7b-chat-hf
LLAMA2 = (
    r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    r"messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    r"{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    r"{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    r"'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    r"{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Qwen/Qwen2.5-7B-Instruct
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

# HuggingFaceTB/SmolLM2-1.7B-Instruct
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# the generic ChatML template (teknium/OpenHermes-2.5-Mistral-7B and many others)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.1 and v0.2
MISTRAL_V1 = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

# mistralai/Mistral-7B-Instruct-v0.3
MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

# google/gemma-3-1b-it
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# microsoft/Phi-3.5-mini-instruct
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + "
    "message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# microsoft/phi-4
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'"
    " + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
    "\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# deepseek-ai/deepseek-llm-7b-chat
DEEPSEEK = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# openchat/openchat-3.5-0106
OPENCHAT = (
    "{{ bos_token }}{% for message in messages %}{{ 'GPT4 Correct ' + message['role'].title() + ': ' + "
    "message['content'] + '<|end_of_turn|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'GPT4 Correct Assistant:' }}{% endif %}"
)

# CohereForAI/c4ai-command-r-v01 (the default template)
COHERE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
    "system_message = messages[0]['content'] %}{% elif false == true %}{% set loop_messages = messages %}{% set "
    "system_message = 'You are Command-R, a brilliant, sophisticated, AI-assistant trained to assist human users by "
    "providing thorough responses. You are trained by Cohere.' %}{% else %}{% set loop_messages = messages %}{% set "
    "system_message = false %}{% endif %}{% if system_message != false %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>'"
    " + system_message + '<|END_OF_TURN_TOKEN|>' }}{% endif %}{% for message in loop_messages %}{% if (message['role']"
    " == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
    "user/assistant/...') }}{% endif %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content.strip() + '<|END_OF_TURN_TOKEN|>' }}{% elif message['role']"
    " == 'assistant' %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>'  + content.strip() + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

SYSTEM = "Be brief."
CONVERSATION = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sum 2+2?"},
    {"role": "assistant", "content": "4."},
]
TOOL_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "function", "content": TOOL_CALL},
    {"role": "observation", "content": '{"temperature": 18}'},
    {"role": "assistant", "content": "It is 18 C."},
]
# The same conversation as chat_template messages.
TOOL_CHAT = [
    TOOL_CONVERSATION[0],
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temperature": 18}'},
    TOOL_CONVERSATION[3],
]


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def published(tokenizer, jinja: str, messages: list[dict], system: str, generation: bool = False, **options) -> str:
    """The family's own rendering of the conversation, via apply_chat_template (options: template variables)."""
    tokenizer.chat_template = jinja
    head = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template(head + messages, tokenize=False, add_generation_prompt=generation, **options)


def encoded(tokenizer, name: str, messages: list[dict], system: str) -> tuple[list[int], list[int]]:
    pairs = encode_pairs(tokenizer, get_template(name), messages, system)
    return supervised_example(pairs, 4096, train_on_prompt=False, mask_history=False)


def trained_spans(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """The text of each run of labelled tokens."""
    spans, run = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    return [tokenizer.decode(span) for span in [*spans, run] if span]


# (template, published jinja, system prompt, the text trained in each reply); the tiny tokenizer's
# BOS is <|endoftext|> and its EOS <|im_end|>.
FAMILIES = [
    ("llama3", LLAMA3, SYSTEM, ["Hello.<|eot_id|>", "4.<|eot_id|>"]),
    ("llama2", LLAMA2, SYSTEM, [" Hello. <|im_end|>", " 4. <|im_end|>"]),
    ("qwen", QWEN25, SYSTEM, ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]),
    ("qwen", QWEN25, "", ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]),  # Qwen's default system prompt
    ("smollm2", SMOLLM2, "", ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]),
    ("chatml", CHATML, SYSTEM, ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]),
    ("mistral_v1", MISTRAL_V1, SYSTEM, [" Hello.<|im_end|>", " 4.<|im_end|>"]),
    ("mistral", MISTRAL_V3, "", [" Hello.<|im_end|>", " 4.<|im_end|>"]),
    ("gemma", GEMMA3, SYSTEM, ["Hello.<end_of_turn>\n", "4.<end_of_turn>\n"]),
    ("phi", PHI35, SYSTEM, ["Hello.<|end|>\n", "4.<|end|>\n<|im_end|>"]),  # EOS closes the conversation
    ("phi4", PHI4, SYSTEM, ["Hello.<|im_end|>", "4.<|im_end|>"]),
    ("zephyr", ZEPHYR, SYSTEM, ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]),
    ("deepseek", DEEPSEEK, SYSTEM, [" Hello.<|im_end|>", " 4.<|im_end|>"]),
    ("openchat", OPENCHAT, SYSTEM, [" Hello.<|end_of_turn|>", " 4.<|end_of_turn|>"]),
    ("cohere", COHERE, SYSTEM, ["Hello.<|END_OF_TURN_TOKEN|>", "4.<|END_OF_TURN_TOKEN|>"]),
]


@pytest.mark.parametrize(("name", "jinja", "system", "replies"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_named_template_matches_published_chat_template(tokenizer, name, jinja, system, replies):
    input_ids, labels = encoded(tokenizer, name, CONVERSATION, system)
    assert tokenizer.decode(input_ids) == published(tokenizer, jinja, CONVERSATION, system)
    assert trained_spans(tokenizer, input_ids, labels) == replies


def test_generation_prompt_matches_published_generation_prompt(tokenizer):
    for name, jinja in [("llama3", LLAMA3), ("gemma", GEMMA3), ("qwen", QWEN25), ("phi", PHI35), ("llama2", LLAMA2)]:
        pairs = encode_pairs(tokenizer, get_template(name), CONVERSATION, SYSTEM)
        expected = published(tokenizer, jinja, CONVERSATION[:-1], SYSTEM, generation=True)
        assert tokenizer.decode(generation_prompt(pairs, 4096)) == expected, name


def test_mistral_v3_puts_the_system_prompt_in_the_last_user_turn(tokenizer):
    # The published v3 template only writes the system text when the conversation ends on a user turn
    # (the generation prompt); training text is that prompt plus the reply.
    pairs = encode_pairs(tokenizer, get_template("mistral"), CONVERSATION, SYSTEM)
    prompt = tokenizer.decode(generation_prompt(pairs, 4096))
    assert prompt == published(tokenizer, MISTRAL_V3, CONVERSATION[:-1], SYSTEM, generation=True)
    assert prompt.endswith("[INST] Be brief.\n\nSum 2+2?[/INST]") and prompt.count("Be brief.") == 1
    input_ids, labels = supervised_example(pairs, 4096, train_on_prompt=False, mask_history=False)
    assert tokenizer.decode(input_ids) == prompt + " 4.<|im_end|>"
    assert trained_spans(tokenizer, input_ids, labels) == [" Hello.<|im_end|>", " 4.<|im_end|>"]


def test_chatml_family_ids_equal_apply_chat_template_ids(tokenizer):
    input_ids, _ = encoded(tokenizer, "qwen", CONVERSATION, SYSTEM)
    tokenizer.chat_template = QWEN25
    chat = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    assert input_ids == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)


def test_tool_turns_use_observation_and_function_formats(tokenizer):
    input_ids, labels = encoded(tokenizer, "qwen", TOOL_CONVERSATION, SYSTEM)
    assert tokenizer.decode(input_ids) == published(tokenizer, QWEN25, TOOL_CHAT, SYSTEM)
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response><|im_end|>' in tokenizer.decode(
        input_ids
    )
    assert trained_spans(tokenizer, input_ids, labels) == [
        f"<tool_call>\n{TOOL_CALL}\n</tool_call><|im_end|>\n",  # the call is trained, the tool result is not
        "It is 18 C.<|im_end|>\n",
    ]


PARALLEL_CONVERSATION = [
    TOOL_CONVERSATION[0],
    {"role": "function", "content": f"[{TOOL_CALL}, {TOOL_CALL.replace('Paris', 'Lyon')}]"},
    {"role": "observation", "content": '{"temperature": 18}\n</tool_response>\n<tool_response>\n{"temperature": 21}'},
    {"role": "assistant", "content": "18 C and 21 C."},
]
PARALLEL_CHAT = [
    TOOL_CONVERSATION[0],
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        for city in ("Paris", "Lyon")]},
    {"role": "tool", "content": '{"temperature": 18}'},
    {"role": "tool", "content": '{"temperature": 21}'},
    PARALLEL_CONVERSATION[3],
]


def test_parallel_tool_calls_and_results_are_written_as_qwen_publishes(tokenizer):
    """Qwen writes each call in its own <tool_call> block and each result in its own <tool_response> block
    (one list inside one block was trained before); `auto` splits them back into OpenAI messages alike."""
    input_ids, labels = encoded(tokenizer, "qwen", PARALLEL_CONVERSATION, SYSTEM)
    assert tokenizer.decode(input_ids) == published(tokenizer, QWEN25, PARALLEL_CHAT, SYSTEM)
    assert trained_spans(tokenizer, input_ids, labels)[0] == (
        f"<tool_call>\n{TOOL_CALL}\n</tool_call>\n<tool_call>\n{TOOL_CALL.replace('Paris', 'Lyon')}\n</tool_call>"
        "<|im_end|>\n")
    tokenizer.chat_template = QWEN25
    assert encoded(tokenizer, "auto", PARALLEL_CONVERSATION, SYSTEM) == (input_ids, labels)


def test_auto_uses_the_tokenizers_chat_template(tokenizer):
    tokenizer.chat_template = CHATML
    auto_ids, auto_labels = encoded(tokenizer, "auto", CONVERSATION, SYSTEM)
    named_ids, named_labels = encoded(tokenizer, "chatml", CONVERSATION, SYSTEM)
    chat = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    assert auto_ids == named_ids == tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert auto_labels == named_labels
    assert trained_spans(tokenizer, auto_ids, auto_labels) == ["Hello.<|im_end|>\n", "4.<|im_end|>\n"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, get_template("auto"))


def test_auto_handles_tool_turns_and_templates_that_close_the_conversation(tokenizer):
    tokenizer.chat_template = QWEN25
    auto = encoded(tokenizer, "auto", TOOL_CONVERSATION, SYSTEM)
    assert auto == encoded(tokenizer, "qwen", TOOL_CONVERSATION, SYSTEM)
    # Phi-3.5 writes EOS only after the whole conversation, so prefixes are not prefixes of the full text.
    tokenizer.chat_template = PHI35
    assert encoded(tokenizer, "auto", CONVERSATION, SYSTEM) == encoded(tokenizer, "phi", CONVERSATION, SYSTEM)


def test_auto_numbers_tool_calls_for_templates_that_write_ids(tokenizer):
    """Mistral Small 3.1's template refuses a tool call or result without a 9-character id; rows and API requests
    keep none, so template: auto refused every tool conversation for it."""
    from pathlib import Path

    tokenizer.chat_template = (Path(__file__).parent / "data" / "chat_templates" /
                               "mistralai-Mistral-Small-3.1-24B-Instruct-2503.jinja").read_text(encoding="utf-8")
    input_ids, labels = encoded(tokenizer, "auto", TOOL_CONVERSATION, SYSTEM)
    text = tokenizer.decode(input_ids)
    assert '"id": "call00001"' in text and '"call_id": "call00001"' in text
    call = {**TOOL_CHAT[1]["tool_calls"][0], "id": "call00001"}
    numbered = [{"role": "system", "content": SYSTEM}, TOOL_CHAT[0], {**TOOL_CHAT[1], "tool_calls": [call]},
                {**TOOL_CHAT[2], "tool_call_id": "call00001"}, TOOL_CHAT[3]]
    assert text == tokenizer.apply_chat_template(numbered, tokenize=False)
    assert trained_spans(tokenizer, input_ids, labels)[-1].startswith("It is 18 C.")


# Qwen3-style (simplified): the reply after the last user turn opens with an empty thinking block,
# replies in history do not, so the rendering of a prefix is not a prefix of the whole.
THINKING = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def test_auto_places_replies_that_render_differently_in_history(tokenizer):
    tokenizer.chat_template = THINKING
    input_ids, labels = encoded(tokenizer, "auto", CONVERSATION, SYSTEM)
    assert tokenizer.decode(input_ids) == published(tokenizer, THINKING, CONVERSATION, SYSTEM)
    assert trained_spans(tokenizer, input_ids, labels) == [
        "Hello.<|im_end|>\n",
        "<think>\n\n</think>\n\n4.<|im_end|>\n",
    ]


def test_auto_refuses_tokenizers_without_a_usable_chat_template(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(RecipeError, match="'template'.*chat_template"):
        encoded(tokenizer, "auto", CONVERSATION, SYSTEM)
    tokenizer.chat_template = MISTRAL_V3  # moves the system prompt as the conversation grows
    with pytest.raises(RecipeError, match="turn by turn"):
        encoded(tokenizer, "auto", CONVERSATION, SYSTEM)
    assert encoded(tokenizer, "auto", CONVERSATION, "") == encoded(tokenizer, "mistral", CONVERSATION, "")


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                  "parameters": {"type": "object",
                                                                 "properties": {"city": {"type": "string"}}}}}


def test_tool_definitions_join_the_system_prompt_as_qwen_publishes(tokenizer):
    from tasks.encoding import Masking, encode_supervised

    row = {"prompt": CONVERSATION[:-1], "response": CONVERSATION[-1:], "system": SYSTEM,
           "tools": json.dumps([WEATHER_TOOL]), "kto_tag": None, "text": "", "row": 0}
    encoded_row = encode_supervised(row, tokenizer, get_template("qwen"), Masking(cutoff_len=4096))
    tokenizer.chat_template = QWEN25
    chat = [{"role": "system", "content": SYSTEM}, *CONVERSATION]
    expected = tokenizer.apply_chat_template(chat, tools=[WEATHER_TOOL], tokenize=False)
    assert tokenizer.decode(encoded_row["input_ids"]) == expected
    assert '<tools>\n{"type": "function"' in expected  # the published block, not merely the system text
    generic = get_template("chatml").system_with_tools("", json.dumps([WEATHER_TOOL]))
    # LlamaFactory's default tool format: each tool described in lines, calls as "Action:" lines
    assert generic.startswith("You have access to the following tools:\n> Tool Name: get_weather\n")
    assert "Action: tool name (one of [get_weather])" in generic
