"""The rm stage's unpadded pair batches: each sequence's reward from one flattened row equals the classifier's
own on the padded batch (the token it pools: the last that is not the pad token, also where the pad token ends
a sequence), and its gradients equal the padded batch's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForSequenceClassification

from tasks.reward import score_head
from tasks.reward_trainer import FlatPairCollator, flat_rewards, pair_collator, pooled_positions
from tests.conftest import tiny_llama_config

PAD = 2
PAIRS = [{"chosen_ids": [5, 6, 7, 30, 31, PAD, 50], "rejected_ids": [5, 6, 7, 40, PAD, 50]},
         {"chosen_ids": [8, 9, 33, PAD], "rejected_ids": [8, 9, 34, 35, 36, 37, PAD, PAD]},  # ends on the pad token
         {"chosen_ids": [10, 11, 12, 13, 38], "rejected_ids": [10, 11, 12, 13, 39, 40, 41]}]


def classifier(lora: bool):
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(64, num_labels=1, pad_token_id=PAD))
    if lora:
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear"))
    return model


def padded(rows):
    sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sequences])
    return ids, torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])


def test_the_pooled_position_is_each_sequences_last_token_that_is_not_the_pad_token():
    batch = FlatPairCollator()(PAIRS)
    starts = [0, 7, 11, 16, 22, 30]  # chosen sequences of 7, 4 and 5 tokens, then rejected ones of 6, 8 and 7
    assert pooled_positions(batch["input_ids"], batch["position_ids"], PAD).tolist() == [
        starts[0] + 6, starts[1] + 2, starts[2] + 4, starts[3] + 5, starts[4] + 5, starts[5] + 6]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_flat_rewards_and_gradients_equal_the_padded_batchs(lora):
    model = classifier(lora)
    assert pair_collator(model) is not None  # switches the model to per-sample attention
    ids, mask = padded(PAIRS)
    expected = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    expected.sum().backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    rewards = flat_rewards(model, score_head(model), FlatPairCollator()(PAIRS), PAD)
    assert torch.allclose(rewards, expected, atol=1e-5)
    rewards.sum().backward()
    for name, grad in expected_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-5), name


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "padded"])
def test_eval_accuracy_and_margin_count_every_pair_once(flat, tiny_model_dir, tmp_path):
    """5 pairs in batches of 2, 2 and 1: the figures are over the 5 pairs, as LlamaFactory's ComputeAccuracy
    counts them, not a mean of the 3 batches' means (which weighs the last pair as much as two)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from tasks.reward_trainer import FlatRewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer), num_labels=1,
                                                             pad_token_id=tokenizer.pad_token_id))
    rows = [{"chosen_ids": [5 + i, 6, 7 + 2 * i], "rejected_ids": [9, 10 + 3 * i]} for i in range(5)]
    args = RewardConfig(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], max_length=None,
                        center_rewards_coefficient=None, use_cpu=True, bf16=False)
    trainer = FlatRewardTrainer(model=model, args=args, processing_class=tokenizer,
                                data_collator=pair_collator(model) if flat else None,
                                train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows))
    scores = trainer.evaluate()
    sequences = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    with torch.no_grad():
        rewards = torch.cat([model(input_ids=torch.tensor([s])).logits.view(1) for s in sequences])
    chosen, rejected = rewards.chunk(2)
    assert scores["eval_accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert scores["eval_margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
