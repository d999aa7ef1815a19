"""Sequence packing: pure functions that pack tokenized samples into rows, and a collator for packed rows.

Attention stays inside each packed sample through transformers' own packed-sequence support: when a model
gets `position_ids` that restart at 0 for every sample and NO `attention_mask`, `masking_utils.
_preprocess_mask_arguments` calls `find_packed_sequence_indices(position_ids)` (a new sequence wherever the
position does not step by +1) and `create_causal_mask` ANDs the causal mask with "same sequence"
(`packed_sequence_compatibility_function`). The detection runs only without an attention_mask and without
a KV cache: packed batches must carry no attention_mask, and the forward must run with use_cache=False (the
Trainer does so: it sets model.config.use_cache from TrainingArguments.use_cache, False by default).
Flash-attention kernels read the same position_ids, but only for one flattened row
(`modeling_flash_attention_utils._is_packed_sequence` needs batch size 1): use `flatten=True` there.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from tasks.templates import IGNORE_INDEX

log = logging.getLogger(__name__)


def pack_pretraining(token_lists: list[list[int]], cutoff_len: int) -> list[list[int]]:
    """Documents (each already ending in EOS: tasks.encoding.encode_document) joined and cut into blocks of
    exactly cutoff_len; the short tail is dropped."""
    if cutoff_len < 1:
        raise ValueError(f"cutoff_len must be >= 1, got {cutoff_len}")
    stream = list(chain.from_iterable(token_lists))
    usable = len(stream) - len(stream) % cutoff_len  # as HF run_clm's group_texts and LlamaFactory's pt
    return [stream[start : start + cutoff_len] for start in range(0, usable, cutoff_len)]


def pack_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, each bin's lengths summing to <= capacity; deterministic."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if any(n > capacity for n in lengths):
        raise ValueError(f"a length exceeds the capacity {capacity}")
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin number), sorted: bisect finds the tightest fit
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):  # ties keep data order
        size = lengths[index]
        slot = bisect.bisect_left(open_bins, (size, -1))
        if slot < len(open_bins):
            room, number = open_bins.pop(slot)
        else:
            room, number = capacity, len(bins)
            bins.append([])
        bins[number].append(index)
        if room - size > 0:
            bisect.insort(open_bins, (room - size, number))
    return [sorted(members) for members in bins]  # samples inside a row keep their data order


def neat_pack(examples: list[tuple[list[int], list[int]]], cutoff_len: int) -> list[dict[str, list[int]]]:
    """Rows of at most cutoff_len tokens holding whole samples, with position_ids restarting at 0 per sample."""
    samples = []
    for number, (input_ids, labels) in enumerate(examples):
        if len(input_ids) != len(labels):
            raise ValueError(f"sample {number}: {len(input_ids)} input_ids but {len(labels)} labels")
        if input_ids:  # an empty sample carries nothing to pack
            samples.append((list(input_ids), list(labels)))
    overlong = sum(len(ids) > cutoff_len for ids, _ in samples)
    if overlong:  # the tokenize stage truncates first; cut the head here rather than overflow a row
        log.warning("neat_pack: %d samples longer than cutoff_len=%d were truncated", overlong, cutoff_len)
        samples = [(ids[:cutoff_len], labels[:cutoff_len]) for ids, labels in samples]
    rows = []
    for members in pack_bins([len(ids) for ids, _ in samples], cutoff_len):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
        for index in members:
            input_ids, labels = samples[index]
            row["input_ids"] += input_ids
            # The first label would be predicted from the previous sample's last token; unpacked it is never a
            # target either (the loss shifts labels by one), so masking it keeps the loss exactly the same.
            row["labels"] += [IGNORE_INDEX, *labels[1:]]
            row["position_ids"] += list(range(len(input_ids)))
        rows.append(row)
    return rows


def padding_share(row_lengths: Sequence[int], batch_size: int) -> float:
    """Share of pad tokens when rows, in order, form batches padded to their longest row."""
    padded = sum(
        max(row_lengths[start : start + batch_size]) * len(row_lengths[start : start + batch_size])
        for start in range(0, len(row_lengths), batch_size)
    )
    return 1 - sum(row_lengths) / padded if padded else 0.0


@dataclass(frozen=True)
class PackedCollator:
    """Batches packed rows as input_ids, labels and position_ids, with no attention_mask (see module docstring)."""

    pad_token_id: int
    flatten: bool = False  # one unpadded row per batch: the varlen form flash-attention kernels need
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [list(row["input_ids"]) for row in rows]
        labels = [list(row.get("labels", r)) for r, row in zip(ids, rows, strict=True)]  # pt blocks: labels = ids
        positions = [list(row.get("position_ids", range(len(r)))) for r, row in zip(ids, rows, strict=True)]
        if any(len(a) != len(b) or len(a) != len(c) for a, b, c in zip(ids, labels, positions, strict=True)):
            raise ValueError("packed rows need input_ids, labels and position_ids of equal length")
        if self.flatten:
            ids, labels, positions = ([list(chain.from_iterable(part))] for part in (ids, labels, positions))
        width = max(len(r) for r in ids)
        if self.pad_to_multiple_of and not self.flatten:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for row_ids, row_labels, row_positions in zip(ids, labels, positions, strict=True):
            pad = width - len(row_ids)
            batch["input_ids"].append(row_ids + [self.pad_token_id] * pad)
            batch["labels"].append(row_labels + [IGNORE_INDEX] * pad)
            # Right padding as its own trailing "sample" (positions from 0): real tokens never attend to it
            # (it comes later, and it is another sequence), and its labels are ignored.
            batch["position_ids"].append(row_positions + list(range(pad)))
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
