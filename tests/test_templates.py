import json

import pytest

from tasks.core.errors import DataError, RecipeError
from tasks.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    Template,
    encode_pairs,
    format_pairs,
    generation_prompt,
    get_template,
    infer_seqlen,
    stop_token_ids,
    supervised_example,
)
from tasks.templates.encode import encode_pieces
from tasks.templates.show import list_templates, render_sample

CONVERSATION = [
    {"role": "user", "content": "Hi {there}"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sum 2+2?"},
    {"role": "assistant", "content": "4."},
]


def test_infer_seqlen_keeps_both_sides_in_proportion():
    assert infer_seqlen(10, 10, 100) == (10, 10)  # fits: untouched
    assert infer_seqlen(300, 20, 100) == (80, 20)  # short target kept whole
    assert infer_seqlen(20, 300, 100) == (20, 80)  # short source kept whole
    assert infer_seqlen(200, 200, 100) == (50, 50)  # both long: split by share
    source, target = infer_seqlen(150, 50, 100)
    assert source + target == 100 and target >= 1
    assert infer_seqlen(14, 30, 22) == (8, 14)  # LlamaFactory's rounding: int(22 * (30 / 44)) is 14, not 15


def test_chatml_two_turns_with_system_tokens_and_mask(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = encode_pairs(tokenizer, get_template("chatml"), CONVERSATION, "Be brief.")
    input_ids, labels = supervised_example(pairs, 1024, train_on_prompt=False, mask_history=False)
    assert tokenizer.decode(input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {there}<|im_end|>\n<|im_start|>assistant\n"
        "Hello.<|im_end|>\n<|im_start|>user\nSum 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    )
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == "Hello.<|im_end|>\n4.<|im_end|>\n"  # loss on every assistant turn, nothing else

    _, history_masked = supervised_example(pairs, 1024, train_on_prompt=False, mask_history=True)
    assert tokenizer.decode([t for t in history_masked if t != IGNORE_INDEX]) == "4.<|im_end|>\n"
    _, all_tokens = supervised_example(pairs, 1024, train_on_prompt=True, mask_history=False)
    assert all_tokens == input_ids


def test_cutoff_truncates_and_generation_prompt_ends_at_assistant_header(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = encode_pairs(tokenizer, get_template("chatml"), CONVERSATION, "")
    input_ids, labels = supervised_example(pairs, 12, train_on_prompt=False, mask_history=False)
    assert len(input_ids) == len(labels) <= 12
    assert any(t != IGNORE_INDEX for t in labels)
    prompt = tokenizer.decode(generation_prompt(pairs, 1024))
    assert prompt.endswith("Sum 2+2?<|im_end|>\n<|im_start|>assistant\n") and "4." not in prompt.split("Sum")[1]


def test_default_system_prompt_is_used_when_row_has_none(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = encode_pairs(tokenizer, get_template("smollm2"), CONVERSATION[:2], "")
    assert tokenizer.decode(pairs[0][0]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
    )


# --- the registry, pure formatting, encoding and the sample view ---------------------------------

REQUIRED = (
    "llama2 llama3 mistral qwen chatml gemma phi phi4 deepseek deepseek3 yi glm4 baichuan2 alpaca vicuna zephyr "
    "default empty smollm cohere falcon openchat intern2 auto"
).split()


def test_registry_has_the_common_families_each_described():
    assert set(REQUIRED) <= set(TEMPLATES)
    assert len([t for t in TEMPLATES.values() if not t.jinja]) >= 20
    assert all(t.description and t.name == name for name, t in TEMPLATES.items())


def test_unknown_template_names_the_key_and_the_closest_or_the_known_names():
    with pytest.raises(RecipeError, match=r"key 'template': unknown template 'lama3'; did you mean 'llama3'\?$"):
        get_template("lama3")
    with pytest.raises(RecipeError, match=r"key 'template': unknown template 'xyz' \(known: .*llama3.*\)"):
        get_template("xyz")


def test_a_turn_format_without_a_content_slot_is_rejected():
    with pytest.raises(ValueError, match="content"):
        Template(name="broken", user="USER:", assistant="{content}")
    with pytest.raises(ValueError, match="system_in_user"):
        Template(name="broken", user="{content}", assistant="{content}", system_in_user="middle")


def test_system_folds_into_the_first_or_last_user_turn():
    first = format_pairs(get_template("gemma"), CONVERSATION, "Be brief.", "<s>", "</s>")
    assert first[0][0] == "<s><start_of_turn>user\nBe brief.\n\nHi {there}<end_of_turn>\n<start_of_turn>model\n"
    assert "Be brief." not in first[1][0]
    last = format_pairs(get_template("mistral"), CONVERSATION, "Be brief.", "<s>", "</s>")
    assert last == [("<s>[INST] Hi {there}[/INST]", " Hello.</s>"), ("[INST] Be brief.\n\nSum 2+2?[/INST]", " 4.</s>")]


def test_suffix_follows_only_the_last_reply_and_a_trailing_user_turn_is_dropped():
    pairs = format_pairs(get_template("phi"), [*CONVERSATION, {"role": "user", "content": "more?"}], "", "", "</s>")
    assert [response for _, response in pairs] == ["Hello.<|end|>\n", "4.<|end|>\n</s>"]


def test_tool_roles_use_their_own_formats_and_roles_must_alternate():
    tools = [
        {"role": "user", "content": "Weather?"},
        {"role": "function", "content": '{"name": "weather", "arguments": {}}'},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    pairs = format_pairs(get_template("llama3"), tools, "", "", "")
    assert pairs[0][1] == '{"name": "weather", "parameters": {}}<|eot_id|>'  # Llama 3.1's JSON call, as LlamaFactory
    assert pairs[1][0].startswith("<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>")
    assert format_pairs(get_template("chatml"), tools, "", "", "")[1][0].startswith("<|im_start|>tool\nsunny")
    # Mistral v3: calls as a list; the system text in the last turn a user opens, not in a tool result
    mistral = format_pairs(get_template("mistral"), tools, "Be brief.", "<s>", "</s>")
    assert mistral[0] == ("<s>[INST] Be brief.\n\nWeather?[/INST]",
                          '[TOOL_CALLS] [{"name": "weather", "arguments": {}}]</s>')
    assert mistral[1][0] == '[TOOL_RESULTS] {"content": sunny}[/TOOL_RESULTS]'
    with pytest.raises(DataError, match="parallel tool calls; the glm4 tool format writes one call per turn"):
        call = tools[1]["content"]
        format_pairs(get_template("glm4"), [tools[0], {"role": "function", "content": f"[{call}, {call}]"}], "", "", "")
    with pytest.raises(DataError, match="message 1 has role 'user'"):
        format_pairs(get_template("chatml"), [CONVERSATION[0], CONVERSATION[0]], "", "", "")


def test_pieces_are_tokenized_together_unless_a_token_would_straddle_them(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["<|im_start|>user\nHi there<|im_end|>\n", "Hello. returns the value<|im_end|>\n"]
    assert sum(encode_pieces(tokenizer, texts), []) == tokenizer("".join(texts), add_special_tokens=False)["input_ids"]
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    word = next(w for w in ["returns", "function", "value", "the"] if len(encode(w)) == 1)
    pieces = encode_pieces(tokenizer, [word[:2], word[2:]])  # one token in the joint text: split per piece
    assert [tokenizer.decode(p) for p in pieces] == [word[:2], word[2:]]


def test_stop_tokens_are_eos_plus_the_known_stop_words(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert stop_token_ids(tokenizer, get_template("llama3")) == [tokenizer.eos_token_id]  # <|eot_id|> not in vocab
    assert stop_token_ids(tokenizer, get_template("auto")) == [tokenizer.eos_token_id]  # no chat_template: EOS only
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # a new turn ends a chatml reply (LlamaFactory's)
    assert im_start in stop_token_ids(tokenizer, get_template("chatml"))
    assert im_start not in stop_token_ids(tokenizer, get_template("qwen"))


def test_show_marks_the_trained_spans(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    shown = render_sample("chatml", tokenizer)
    assert shown.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
    assert "<|im_start|>assistant\n⟦4.<|im_end|>\n⟧<|im_start|>user" in shown and shown.endswith("⟦8.<|im_end|>\n⟧")
    assert render_sample("llama2").startswith("<bos>[INST] <<SYS>>\nYou are a concise assistant.\n<</SYS>>\n\n")
    # an efficient_eos template's stop, learnt where the next prompt starts, is shown as the label it is
    assert "<|assistant|>⟦\n4.⟧⟦<|im_end|>⟧<|user|>" in render_sample("glm4", tokenizer)
    with pytest.raises(RecipeError, match="auto"):
        render_sample("auto")
    names = [name for name, _ in list_templates()]
    assert names == sorted(names) and "auto" in names and "gemma" in names


def test_show_tools_renders_the_tool_format_sample(capsys):
    from flows.cli import main

    tools = render_sample("qwen", tools=True)
    assert "<tools>\n" in tools and tools.count("<tool_call>\n{") == 3  # the prompt's example and two calls
    assert '⟦[{"name": "get_weather", "parameters": {"city": "Paris"}}' in render_sample("llama3", tools=True)
    assert "⟦Action: get_weather\nAction Input:" in render_sample("chatml", tool_format="default", tools=True)
    assert main(["templates", "show", "smollm2", "--tool-format", "llama3"]) == 0
    assert '"parameters": {"city": "Lyon"}' in capsys.readouterr().out
    assert main(["templates", "show", "chatml", "--tool-format", "qwn"]) == 1
    assert "--tool-format qwn: not a tool format (default, qwen, llama3, mistral, glm4); did you mean 'qwen'?" in (
        capsys.readouterr().err)


def test_mask_history_keeps_the_last_turn_and_cuts_older_turns_first():
    # Three exchanges of 30 prompt + 20 reply tokens at cutoff 100: the last one must survive whole.
    pairs = [([10 * turn + 1] * 30, [10 * turn + 2] * 20) for turn in range(3)]
    input_ids, labels = supervised_example(pairs, 100, train_on_prompt=False, mask_history=True)
    assert input_ids == pairs[1][0] + pairs[1][1] + pairs[2][0] + pairs[2][1]  # the oldest turn is dropped
    assert [t for t in labels if t != IGNORE_INDEX] == pairs[2][1]  # only the last reply is trained
    # Without mask_history the first turns are kept and the last is cut, as before.
    input_ids, labels = supervised_example(pairs, 100, train_on_prompt=False, mask_history=False)
    assert input_ids == [t for pair in pairs[:2] for part in pair for t in part]
    # A budget smaller than the last turn truncates it in proportion, still trainable.
    input_ids, labels = supervised_example(pairs, 40, train_on_prompt=False, mask_history=True)
    assert len(input_ids) == 40 and any(t != IGNORE_INDEX for t in labels) and labels[-1] == pairs[2][1][0]


def test_default_template_renders_as_llamafactory_0_9_3():
    pairs = format_pairs(get_template("default"), CONVERSATION, "Be brief.", "<s>", "</s>")
    assert "".join(p + r for p, r in pairs) == (
        "System: Be brief.</s>\nHuman: Hi {there}</s>\nAssistant:Hello.</s>\nHuman: Sum 2+2?</s>\nAssistant:4.</s>\n")
    assert [r for _, r in pairs] == ["Hello.</s>\n", "4.</s>\n"]


def test_tool_lists_are_json_arrays_where_a_format_writes_one():
    """Phi-4-mini's <|tool|> block and Mistral's [AVAILABLE_TOOLS] hold a JSON array of the definitions:
    one definition per line inside brackets was no JSON at all once there were two."""
    from dataclasses import replace

    from tasks.templates.tools import TOOL_FORMATS

    tools = [{"name": "get_weather", "parameters": {}}, {"name": "get_time", "parameters": {}}]
    phi = get_template("phi4_mini").system_with_tools("SYS", json.dumps(tools))
    assert json.loads(phi.split("<|tool|>")[1].removesuffix("<|/tool|>")) == tools
    with_mistral_tools = replace(get_template("chatml"), tools=TOOL_FORMATS["mistral"].tools)
    mistral = with_mistral_tools.system_with_tools("", json.dumps(tools))
    assert json.loads(mistral.removeprefix("[AVAILABLE_TOOLS] ").removesuffix("[/AVAILABLE_TOOLS]")) == [
        {"type": "function", "function": tool} for tool in tools]  # as Mistral's template and LlamaFactory wrap them


@pytest.mark.parametrize("name", ["qwen", "llama3", "mistral", "phi4_mini", "chatml", "glm4"])
def test_bare_and_wrapped_tool_definitions_write_the_same_prompt(name):
    """Datasets hold bare definitions, OpenAI clients send wrapped ones: qwen, llama3 and mistral wrote each as it
    came, so the served prompt differed from the trained one (LlamaFactory's formatters wrap bare ones)."""
    bare = [{"name": "get_weather", "description": "Weather in a city.",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    wrapped = [{"type": "function", "function": tool} for tool in bare]
    template = get_template(name)
    assert template.system_with_tools("SYS", json.dumps(bare)) == template.system_with_tools("SYS", json.dumps(wrapped))


@pytest.mark.parametrize("name", ["qwen", "default", "mistral", "llama3", "glm4"])
def test_an_empty_tool_list_writes_no_tool_prompt(name):
    """109 of the 300 rows of LlamaFactory's glaive_toolcall_en_demo offer "tools": "[]"; its ToolFormatter writes
    nothing for them, as for a row without tools."""
    template = get_template(name)
    assert template.system_with_tools("SYS", "[]") == template.system_with_tools("SYS", "") == "SYS"


@pytest.mark.parametrize("name", ["ministral", "mistral_small"])
def test_mistral_tekken_templates_list_tools_and_write_calls_as_mistral(name):
    """As LlamaFactory's ministral and mistral_small: [AVAILABLE_TOOLS] and a JSON list after [TOOL_CALLS], not the
    default format's Action: lines inside Mistral's tool tokens."""
    template = get_template(name)
    tools = [{"name": "get_weather", "parameters": {}}]
    assert "[AVAILABLE_TOOLS]" in template.system_with_tools("SYS", json.dumps(tools))
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    turns = [{"role": "user", "content": "Weather?"}, {"role": "function", "content": call}]
    reply = format_pairs(template, turns, "", "<s>", "</s>")[0][1]
    assert reply == '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]</s>'


def test_llama3_lists_tools_as_llama_3_1_and_llamafactory_write_them():
    tools = [{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}]
    written = get_template("llama3").system_with_tools("", json.dumps(tools))
    blocks = "".join(json.dumps({"type": "function", "function": t}, indent=4) + "\n\n" for t in tools)
    assert written.endswith("Do not use variables.\n\n" + blocks)


def test_a_turn_the_template_cannot_write_names_its_row(tiny_model_dir):
    from transformers import AutoTokenizer

    from tasks.encoding import Masking, encode_supervised

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    call = '{"name": "f", "arguments": {}}'
    row = {"prompt": [{"role": "user", "content": "Hi"}], "system": "", "tools": "", "kto_tag": None, "text": "",
           "response": [{"role": "function", "content": f"[{call}, {call}]"}], "row": 7}
    with pytest.raises(DataError, match="^row 7: a function turn holds parallel tool calls"):
        encode_supervised(row, tokenizer, get_template("glm4"), Masking(cutoff_len=64))
