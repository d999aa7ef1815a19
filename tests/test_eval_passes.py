"""One forward of prompt + reply gives the same perplexity and the same replies as the two passes apart."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tasks.eval_passes import cut_cache, generate, perplexity, score_and_generate
from tasks.lean_training import use_varlen_attention
from tests.conftest import tiny_llama_config

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21]]
REPLIES = [[30, 31, 32, 2], [33, 2], [34, 35, 36, 37, 38, 2], [39, 40, 2]]
GENERATION = {"pad_token_id": 0, "stop_token_ids": [2]}


def tiny_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(64, num_attention_heads=4, num_key_value_heads=2)).float().eval()
    use_varlen_attention(model)  # as the evaluate stage loads it
    return model


def eval_rows(prompts=PROMPTS, train_on_prompt=False):
    """Supervised eval rows: input = prompt + reply, loss on the reply only (or on every token)."""
    inputs = [p + r for p, r in zip(PROMPTS, REPLIES, strict=True)]
    labels = inputs if train_on_prompt else [[-100] * len(p) + r for p, r in zip(PROMPTS, REPLIES, strict=True)]
    return {"prompt_ids": prompts, "input_ids": inputs, "labels": labels}


CONFIG = SimpleNamespace(sampling=None, batch_size=3, max_new_tokens=5, repetition_penalty=None, progress=False)
TOKENIZER = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: [" ".join(map(str, r)) for r in ids.tolist()])


@pytest.mark.parametrize("prompts,train_on_prompt", [(PROMPTS, False), ([PROMPTS[0][1:], *PROMPTS[1:]], False),
                                                     (PROMPTS, True)], ids=["all-shared", "one-apart", "all-labelled"])
def test_one_forward_gives_the_perplexity_and_replies_of_the_two_passes(prompts, train_on_prompt):
    model = tiny_model()
    rows = eval_rows(prompts, train_on_prompt)  # "one-apart": the first row's input does not begin with its prompt
    scores, replies = score_and_generate(model, TOKENIZER, rows, CONFIG, GENERATION)
    expected = perplexity(model, rows, 0, CONFIG.batch_size, progress=False)
    assert scores["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-6)
    assert replies == generate(model, TOKENIZER, prompts, CONFIG, GENERATION)
    assert len(set(replies)) > 1  # the replies depend on the prompt: the cache was not mixed up across rows


def test_a_sliding_window_cache_is_not_cut_generation_prefills_afresh():
    from transformers import DynamicCache

    config = tiny_llama_config(64, num_attention_heads=4, num_key_value_heads=2)
    config.sliding_window, config.layer_types = 4, ["sliding_attention"] * config.num_hidden_layers
    assert cut_cache(DynamicCache(config=config), 3) is None
    plain = DynamicCache(config=tiny_llama_config(64, num_attention_heads=4, num_key_value_heads=2))
    plain.update(torch.zeros(1, 2, 6, 16), torch.zeros(1, 2, 6, 16), layer_idx=0)
    assert cut_cache(plain, 3).get_seq_length() == 3


def test_no_reply_token_to_score_is_an_error_not_a_perfect_perplexity():
    """A loss of 0 over 0 tokens read as perplexity 1.0, a score retune would promote."""
    from tasks.core.errors import DataError
    from tasks.eval_passes import loss_metrics

    assert loss_metrics(2.0, 4) == {"eval_loss": 0.5, "perplexity": pytest.approx(1.6487, abs=1e-4)}
    with pytest.raises(DataError, match="no reply token to score"):
        loss_metrics(0.0, 0)
