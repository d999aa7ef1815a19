"""Packing: packed batches give the same loss and logits as unpacked samples; the packers keep every token."""

from __future__ import annotations

import random

import pytest
import torch

from tasks.packing import PackedCollator, neat_pack, pack_bins, pack_pretraining, padding_share
from tasks.templates import IGNORE_INDEX
from tests.conftest import tiny_llama_config

VOCAB = 100
PAD = 0


@pytest.fixture(scope="module")
def model():
    """A 2-layer random Llama on SDPA in float32; a wide init so cross-sample attention shows in the loss."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(VOCAB, max_position_embeddings=256, initializer_range=0.2, pad_token_id=PAD)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def make_samples(lengths: list[int], seed: int = 0, train_on_prompt: bool = False) -> list[tuple[list[int], list]]:
    """Random (input_ids, labels) samples; the first third of each is a masked prompt unless train_on_prompt."""
    rng = random.Random(seed)
    samples = []
    for n in lengths:
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        prompt = 0 if train_on_prompt else n // 3
        samples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return samples


SAMPLES = make_samples([5, 17, 9, 30, 3, 12, 22, 8, 1, 14], train_on_prompt=True)


def forward(model, **inputs):
    """Logits, summed token NLL over label tokens, and label-token count, through the model's own loss."""
    with torch.no_grad():  # use_cache=False as in training: a KV cache turns packed-sequence detection off
        out = model(**inputs, use_cache=False)
    count = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.logits, float(out.loss) * count if count else 0.0, count  # no target: the mean loss is NaN


def unpacked(model, samples):
    """Summed NLL, label count and per-sample logits, one sample per forward with no padding."""
    total, count, logits = 0.0, 0, []
    for ids, labels in samples:
        sample_logits, nll, n = forward(model, input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        total, count = total + nll, count + n
        logits.append(sample_logits[0])
    return total, count, logits


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row, read from the restarting position ids."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:], strict=False))


def test_packed_loss_and_logits_match_unpacked(model):
    rows = neat_pack(SAMPLES, cutoff_len=40)
    assert len(rows) < len(SAMPLES)
    batch = PackedCollator(PAD)(rows)
    assert "attention_mask" not in batch
    logits, nll, count = forward(model, **batch)
    ref_nll, ref_count, ref_logits = unpacked(model, SAMPLES)
    assert count == ref_count  # train_on_prompt: only each sample's first token (never a target) is lost
    assert nll == pytest.approx(ref_nll, rel=1e-4)
    by_ids = {tuple(ids): i for i, (ids, _) in enumerate(SAMPLES)}
    seen = 0
    for r, row in enumerate(rows):
        for start, end in segments(row["position_ids"]):
            index = by_ids[tuple(row["input_ids"][start:end])]
            torch.testing.assert_close(logits[r, start:end], ref_logits[index], rtol=1e-4, atol=1e-5)
            seen += 1
    assert seen == len(SAMPLES)


def test_flattened_batch_matches_unpacked(model):
    batch = PackedCollator(PAD, flatten=True)(neat_pack(SAMPLES, cutoff_len=40))
    assert batch["input_ids"].shape[0] == 1
    _, nll, _ = forward(model, **batch)
    assert nll == pytest.approx(unpacked(model, SAMPLES)[0], rel=1e-4)


def test_padding_does_not_change_loss_or_logits(model):
    rows = neat_pack(SAMPLES, cutoff_len=40)
    tight = PackedCollator(PAD)(rows)
    wide = PackedCollator(PAD, pad_to_multiple_of=64)(rows)
    assert wide["input_ids"].shape[1] == 64
    logits, nll, count = forward(model, **tight)
    wide_logits, wide_nll, wide_count = forward(model, **wide)
    assert (count, wide_nll) == (wide_count, pytest.approx(nll, rel=1e-5))
    real = tight["labels"].shape[1]
    torch.testing.assert_close(wide_logits[:, :real], logits, rtol=1e-4, atol=1e-5)


def test_negative_controls_cross_sample_attention_changes_loss(model):
    batch = PackedCollator(PAD)(neat_pack(SAMPLES, cutoff_len=40))
    ref_nll = unpacked(model, SAMPLES)[0]
    _, plain, _ = forward(model, input_ids=batch["input_ids"], labels=batch["labels"])  # no restarting positions
    _, masked, _ = forward(model, **batch, attention_mask=torch.ones_like(batch["input_ids"]))  # detection off
    for nll in (plain, masked):
        assert abs(nll - ref_nll) / ref_nll > 1e-3


def test_pack_pretraining_chunks_documents_that_end_in_eos():
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 0]]  # as encode_document ends them; packing adds no second EOS
    assert pack_pretraining(docs, 3) == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack_pretraining(docs, 4) == [[1, 2, 3, 0], [4, 5, 0, 6]]  # short tail [0] dropped
    assert pack_pretraining(docs, 10) == []
    assert pack_pretraining([], 4) == []
    with pytest.raises(ValueError):
        pack_pretraining(docs, 0)


def test_pretraining_rows_collate_with_labels_equal_ids():
    batch = PackedCollator(PAD)([{"input_ids": block} for block in pack_pretraining([[1, 2, 3, 9], [4, 5, 9]], 3)])
    assert batch["labels"].tolist() == batch["input_ids"].tolist() == [[1, 2, 3], [9, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_neat_pack_keeps_every_token_once_within_cutoff():
    rng = random.Random(1)
    samples = make_samples([rng.randint(1, 64) for _ in range(200)], seed=1)
    rows = neat_pack(samples, cutoff_len=64)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 64 for r in rows)
    unpacked_rows = []
    for row in rows:
        for start, end in segments(row["position_ids"]):
            assert row["position_ids"][start:end] == list(range(end - start))
            unpacked_rows.append((row["input_ids"][start:end], row["labels"][start:end]))
    expected = [(ids, [IGNORE_INDEX, *labels[1:]]) for ids, labels in samples]  # first label: never a target
    assert sorted(unpacked_rows) == sorted(expected)
    total = sum(len(ids) for ids, _ in samples)
    assert len(rows) <= 11 / 9 * -(-total // 64) + 1  # best-fit-decreasing bound
    assert neat_pack(samples, cutoff_len=64) == rows  # deterministic


def test_neat_pack_rows_keep_data_order_and_edge_cases(caplog):
    assert pack_bins([3, 5, 2, 4], 8) == [[0, 1], [2, 3]]  # best fit: 5+3 fills a row, then 4+2; data order kept
    rows = neat_pack([([7] * 12, [7] * 12), ([], []), ([8, 9], [8, 9])], cutoff_len=10)
    assert [r["input_ids"] for r in rows] == [[7] * 10, [8, 9]]  # overlong: truncated; empty: dropped
    assert "truncated" in caplog.text
    with pytest.raises(ValueError):
        neat_pack([([1, 2], [1])], cutoff_len=10)
    with pytest.raises(ValueError):
        PackedCollator(PAD)([{"input_ids": [1, 2], "labels": [1], "position_ids": [0, 1]}])


def test_packing_saves_padding():
    lengths = [30, 4, 22, 9, 17, 3, 26, 11]
    samples = make_samples(lengths)
    rows = neat_pack(samples, cutoff_len=32)
    packed_lengths = [len(r["input_ids"]) for r in rows]
    assert sorted(packed_lengths) == [29, 30, 31, 32]  # 122 tokens in 4 rows: the least possible
    assert padding_share(lengths, 4) == pytest.approx(1 - 122 / 224)  # two batches padded to 30 and 26
    assert padding_share(packed_lengths, 4) == pytest.approx(1 - 122 / 128)
    one_batch = PackedCollator(PAD)([{"input_ids": ids, "labels": labels} for ids, labels in samples])
    assert PackedCollator(PAD)(rows)["input_ids"].numel() == 128 < one_batch["input_ids"].numel() == 240
