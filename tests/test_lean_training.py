"""Padding-free batches, per-sample attention and label-only logits give the padded batch's loss and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.lean_training import (
    SHAPE_BUCKET,
    FlatCollator,
    bucketed_row,
    label_logits,
    label_positions,
    sample_bounds,
    sequence_starts,
    supports_label_only_logits,
    token_loss,
    trainer_class,
)
from tasks.packing import neat_pack
from tasks.varlen_attention import VARLEN_ATTENTION, register_varlen_attention
from tests.conftest import tiny_llama_config

ROWS = [  # prompts masked with -100, replies of different lengths: a batch that pads by 60%
    {"input_ids": [5, 6, 7, 8, 9, 10, 11], "labels": [-100, -100, -100, -100, 9, 10, 11]},
    {"input_ids": [12, 13, 14], "labels": [-100, 13, 14]},
    {"input_ids": [15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26], "labels": [-100] * 9 + [24, 25, 26]},
    {"input_ids": [27, 28], "labels": [-100, 28]},
]


def tiny_model(kv_heads: int = 2, attn: str = "sdpa", **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    register_varlen_attention()
    config = tiny_llama_config(64, num_attention_heads=4, num_key_value_heads=kv_heads, attn_implementation=attn,
                               **overrides)
    return LlamaForCausalLM(config).float()


class PadOnly:
    """Just enough of a tokenizer for DataCollatorForSeq2Seq: right padding with id 0 and an attention mask."""

    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features, **kwargs):
        width = max(len(f["input_ids"]) for f in features)
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                                for f in features])}


def padded_collator():
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(PadOnly(), label_pad_token_id=-100, padding=True)


def padded_loss(model, rows):
    return model(**padded_collator()([dict(r) for r in rows])).loss


def lean_loss(model, rows):
    """The train stage's loss step: the flat row bucketed to SHAPE_BUCKET, logits at label positions."""
    return token_loss(*label_logits(model, FlatCollator()([dict(r) for r in rows])))


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_flat_varlen_label_only_step_equals_the_padded_step(kv_heads):
    model = tiny_model(kv_heads)
    padded_loss(model, ROWS).backward()
    expected = gradients(model)
    model.zero_grad()
    model.set_attn_implementation(VARLEN_ATTENTION)
    loss = lean_loss(model, ROWS)
    loss.backward()
    assert loss.item() == pytest.approx(padded_loss(tiny_model(kv_heads), ROWS).item(), abs=1e-5)
    got = gradients(model)
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def test_without_per_sample_attention_the_flat_loss_differs():
    """Negative control: a flat row with plain causal attention across samples changes the loss."""
    model = tiny_model()
    batch = FlatCollator()([dict(r) for r in ROWS])
    targets, keep = label_positions(batch.pop("labels"))
    batch.pop("position_ids")  # positions run on: one long sequence, attention crosses samples
    logits = model(**batch, logits_to_keep=keep, use_cache=False).logits
    crossed = token_loss(logits.reshape(-1, logits.shape[-1]), targets[keep]).item()
    assert abs(crossed - padded_loss(model, ROWS).item()) > 1e-3


def test_output_head_sees_only_label_positions_rounded_up_to_the_shape_bucket():
    model = tiny_model(attn=VARLEN_ATTENTION)
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape))
    ids = [i % 60 + 1 for i in range(150)]
    long_rows = [{"input_ids": ids, "labels": [-100] * 140 + ids[140:]}] * 3
    lean_loss(model, long_rows)
    trained = 3 * 10
    assert rows_seen == [torch.Size([SHAPE_BUCKET, 32])]  # 30 label positions, filled to one bucket
    assert SHAPE_BUCKET < 3 * 150 / 4 and trained < SHAPE_BUCKET


def test_bucketed_row_pads_to_the_grid_without_changing_the_loss():
    model = tiny_model(attn=VARLEN_ATTENTION)
    batch = FlatCollator()([dict(r) for r in ROWS])
    targets, keep = label_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    grown, grown_targets, grown_keep = bucketed_row(inputs, targets, keep)
    assert grown["input_ids"].shape[1] % SHAPE_BUCKET == 0 and int(grown_keep.sum()) % SHAPE_BUCKET == 0
    assert grown["position_ids"][0, :24].tolist() == batch["position_ids"][0].tolist()
    assert grown["position_ids"][0, 23:26].tolist() == [1, 2, 3]  # the last sample runs on: no new sample
    assert (grown_targets[grown_keep] != -100).sum() == (targets[keep] != -100).sum()
    exact = model(**inputs | sample_bounds(inputs["position_ids"]), use_cache=False).logits[0, :24]
    assert torch.allclose(model(**grown | sample_bounds(grown["position_ids"]), use_cache=False).logits[0, :24],
                          exact, atol=1e-5)


def test_flat_collator_marks_samples_and_never_predicts_across_them():
    batch = FlatCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    bounds = sample_bounds(batch["position_ids"])
    assert bounds["cu_seq_lens_q"].tolist() == [0, 3, 5] and bounds["max_length_q"] == 3


def test_flat_collator_keeps_neat_packed_samples_apart_and_blocks_whole():
    samples = [([1, 2, 3], [-100, 2, 3]), ([4, 5, 6, 7], [-100, -100, 6, 7]), ([8, 9], [-100, 9])]
    packed = neat_pack(samples, cutoff_len=6)
    batch = FlatCollator()(packed)
    starts = sequence_starts(batch["position_ids"][0].tolist())
    assert len(starts) == 3 and sample_bounds(batch["position_ids"])["cu_seq_lens_q"].tolist() == [*starts, 9]
    assert sorted(batch["labels"][0].tolist()) == sorted([-100] * 4 + [2, 3, 6, 7, 9])
    blocks = FlatCollator()([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6, 7, 8]}])  # pretraining blocks
    assert blocks["labels"].tolist() == [[-100, 2, 3, 4, -100, 6, 7, 8]]


def test_label_only_trainer_trains_like_the_default_trainer(tmp_path):
    """Two optimizer steps with gradient accumulation: the same weights as transformers' own loss path."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    def train(trainer_type, collator, attn):
        lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        model = get_peft_model(tiny_model(attn=attn), lora)
        args = TrainingArguments(output_dir=str(tmp_path / attn), per_device_train_batch_size=2, max_steps=2,
                                 gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True,
                                 save_strategy="no", remove_unused_columns=False, seed=0, disable_tqdm=True)
        trainer_type(model=model, args=args, train_dataset=ROWS * 2, data_collator=collator).train()
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    expected = train(Trainer, padded_collator(), "sdpa")
    got = train(trainer_class(), FlatCollator(), VARLEN_ATTENTION)
    assert supports_label_only_logits(tiny_model())
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-5), name


def test_evaluate_perplexity_on_flat_batches_equals_the_padded_computation():
    from tasks.eval_passes import padded_batch, perplexity

    model = tiny_model(attn=VARLEN_ATTENTION).eval()
    rows = {"input_ids": [r["input_ids"] for r in ROWS], "labels": [r["labels"] for r in ROWS]}
    lean = perplexity(model, rows, pad_id=0, batch_size=3, progress=False)
    inputs = padded_batch(0)([dict(r) for r in ROWS])
    targets = inputs.pop("labels")[:, 1:]
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
    assert lean["eval_loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_preference_batches_are_flat_only_when_the_policy_and_the_reference_can_take_them():
    from tasks.preference_trainer import use_flat_batches

    remote = tiny_model()
    remote.__class__ = type("RemoteCodeLlama", (type(remote),), {})  # defined outside transformers.models
    model = tiny_model()
    assert not use_flat_batches(model, remote)
    assert model.config._attn_implementation == remote.config._attn_implementation == "sdpa"
    assert use_flat_batches(model, None) and model.config._attn_implementation == VARLEN_ATTENTION


def test_evaluated_pair_margins_on_flat_batches_equal_the_padded_computation():
    from tasks.eval_passes import padded_batch
    from tasks.evaluate import pair_preference
    from tasks.preference_losses import sequence_logps, token_logps

    model = tiny_model(attn=VARLEN_ATTENTION).eval()
    chosen, rejected = [ROWS[0], ROWS[1], ROWS[3]], [ROWS[2], ROWS[3], ROWS[1]]
    pairs = {"chosen_ids": [r["input_ids"] for r in chosen], "chosen_labels": [r["labels"] for r in chosen],
             "rejected_ids": [r["input_ids"] for r in rejected], "rejected_labels": [r["labels"] for r in rejected]}
    lean = pair_preference(model, pairs, pad_id=0, batch_size=2, progress=False)
    inputs = padded_batch(0)([dict(r) for r in chosen + rejected])
    labels = inputs.pop("labels")
    with torch.no_grad():
        averaged = sequence_logps(*token_logps(model(**inputs).logits, labels), average=True)
    margins = averaged[:3] - averaged[3:]
    assert lean["num_pairs"] == 3 and lean["pair_accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert lean["pair_margin"] == pytest.approx(margins.mean().item(), abs=1e-5)


def test_generation_in_length_sorted_batches_keeps_the_prompts_order():
    from types import SimpleNamespace

    from tasks.eval_passes import generate

    model = tiny_model(attn=VARLEN_ATTENTION).eval()
    decode = lambda ids, skip_special_tokens: [" ".join(map(str, row)) for row in ids.tolist()]
    tokenizer = SimpleNamespace(batch_decode=decode)
    prompts = [r["input_ids"] for r in ROWS]
    config = SimpleNamespace(sampling=None, batch_size=2, max_new_tokens=4, repetition_penalty=1.0, progress=False)
    generation = {"pad_token_id": 0, "stop_token_ids": [1]}
    batched = generate(model, tokenizer, prompts, config, generation)
    one_by_one = [generate(model, tokenizer, [p], config, generation)[0] for p in prompts]
    assert batched == one_by_one
    assert len(set(batched)) > 1


def test_a_bf16_autocast_step_gives_nearly_the_fp32_loss():
    """`bf16: true` on a CPU with bf16 instructions trains under autocast: the same step, rounded matmuls."""
    model = tiny_model(attn=VARLEN_ATTENTION)
    exact = lean_loss(model, ROWS).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = lean_loss(model, ROWS)
    rounded.backward()
    assert rounded.dtype == torch.float32 and rounded.item() == pytest.approx(exact, rel=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_bf16_recipe_trains_in_the_precision_the_cpu_computes(write_recipe, monkeypatch, native_bf16):
    """`bf16: true` trains under bf16 autocast on a CPU with bf16 instructions and in fp32 on one without
    (emulated bf16 is slower than fp32). The probe is set either way, so both paths run on any CPU."""
    from flows.finetune import finetune
    from tasks.core import hardware
    from tasks.core.recipe import load_recipe

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)
    summary = finetune(load_recipe(write_recipe(bf16=True, do_eval=False, max_steps=2)))
    train = json.loads((Path(summary.artifacts["train"]) / "train_results.json").read_text())
    manifest = json.loads((Path(summary.artifacts["train"]) / "manifest.json").read_text())
    assert manifest["config"]["precision"] == ("bf16" if native_bf16 else "fp32") and train["global_step"] == 2
    assert train["padding_share"] == 0.0 and train["tokens_trained"] > 0


@pytest.mark.parametrize("tied", [False, True])
def test_frozen_weights_held_in_bf16_give_autocast_numbers_on_bf16_rounded_embeddings(tied):
    """Held in bf16, the frozen linears give autocast's numbers exactly; the embeddings' one change is their
    rows rounded to bf16 (the lookup is not autocast), so the reference rounds its fp32 table the same way."""
    from peft import LoraConfig, get_peft_model

    from tasks.train_methods import hold_frozen_weights_in_bf16

    def lora_model():
        model = get_peft_model(tiny_model(attn=VARLEN_ATTENTION, tie_word_embeddings=tied),
                               LoraConfig(r=4, target_modules="all-linear"))
        torch.manual_seed(3)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the adapter takes part in the loss
                torch.nn.init.normal_(parameter, std=0.1)
        return model

    def autocast_step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lean_loss(model, ROWS)
        loss.backward()
        return loss.item(), gradients(model)

    cast = lora_model()
    hold_frozen_weights_in_bf16(cast)
    dtypes = {name: p.dtype for name, p in cast.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"] == torch.float32
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    assert cast.get_output_embeddings().weight.dtype == torch.bfloat16
    assert dtypes["base_model.model.model.norm.weight"] == torch.float32
    assert cast.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32  # the residual stream's
    reference = lora_model()
    table = reference.get_input_embeddings().weight
    table.data = table.data.to(torch.bfloat16).float()
    (loss, grads), (expected_loss, expected_grads) = autocast_step(cast), autocast_step(reference)
    assert loss == expected_loss
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)


def test_preference_logps_from_label_positions_and_flat_rows_equal_the_padded_full_logits_ones():
    """The preference stage's per-token log-probs, from label-only logits on a right-padded pair batch and on
    the pair flattened into one row: the padded full-logits values and gradients, with the head run at the
    label positions alone."""
    from tasks.lean_training import label_token_logps
    from tasks.preference_trainer import PairCollator

    pair = {"chosen_ids": ROWS[0]["input_ids"], "chosen_labels": ROWS[0]["labels"],
            "rejected_ids": ROWS[2]["input_ids"], "rejected_labels": ROWS[2]["labels"]}
    results = {}
    for layout, flat, label_only in (("full", False, False), ("label-only", False, True), ("flat", True, True)):
        batch = PairCollator(pad_token_id=0, flat=flat)([pair])
        model = tiny_model(attn=VARLEN_ATTENTION if flat else "sdpa")
        rows_seen: list[torch.Size] = []
        model.lm_head.register_forward_hook(lambda module, args, out, seen=rows_seen: seen.append(args[0].shape[:-1]))
        labels = batch.pop("labels")
        logps, mask = label_token_logps(model, batch, labels, label_only)
        (logps.sum(-1) * torch.tensor([1.0, -0.5])).sum().backward()
        results[layout] = logps.detach(), mask, gradients(model), rows_seen
    full, full_mask, full_grads, full_rows = results.pop("full")
    assert int(full_mask.sum()) == 3 + 3 and full_rows == [torch.Size([2, 12])]
    for layout, (logps, mask, grads, _) in results.items():
        assert torch.equal(mask, full_mask), layout
        assert torch.allclose(logps, full, atol=1e-5) and bool((logps[~mask] == 0).all()), layout
        for name in full_grads:
            assert torch.allclose(grads[name], full_grads[name], atol=1e-5), (layout, name)
    assert results["label-only"][3] == [torch.Size([6])]
    assert results["flat"][3] == [torch.Size([SHAPE_BUCKET])]  # 6 label positions, filled to one bucket
