from tasks.templates import (
    IGNORE_INDEX,
    encode_pairs,
    generation_prompt,
    get_template,
    infer_seqlen,
    supervised_example,
)

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
    pairs = encode_pairs(tokenizer, get_template("smollm"), CONVERSATION[:2], "")
    assert tokenizer.decode(pairs[0][0]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
    )
