"""Training steps that compute only what the loss uses: no pad tokens, no attention across samples, and
the output head only where a label is.

What it does, each part through a supported transformers hook:
- `FlatCollator` lays a batch out as ONE row of all its samples end to end (no padding), with
  position_ids restarting per sample (transformers' DataCollatorWithFlattening). The samples and their
  order are the batch's own: the optimizer sees exactly the unpadded batch. The loss step derives the
  sample boundaries from the positions (`cu_seq_lens_q`/`cu_seq_lens_k`, the names of transformers'
  flash-attention kwargs), and the model forwards them to its attention function. (They are not part
  of the batch: accelerate's dispatcher for streamed data slices every batch tensor along its first
  dimension.)
- The attention implementation "sdpa_varlen" (tasks.varlen_attention) runs causal SDPA sample by sample
  over those boundaries, so no sample attends to another and no compute goes to the cross-sample blocks.
- `LabelOnlyLossTrainer.compute_loss` asks the model for logits only at positions that predict a label
  (`logits_to_keep` as a boolean mask): in SFT about a tenth of the positions, so most of the output
  head's matmul, its full-vocabulary logits and their gradient are never computed. The loss is the same
  token-mean cross-entropy the model's own loss computes (summed over `num_items_in_batch` under
  gradient accumulation, as the Trainer expects).
- `label_token_logps` does the same for the preference stage (dpo, kto) and the evaluation of pairs: the
  per-token log-probs of the replies from logits at label positions, on flattened pair batches.
- Shapes stay on a grid (`bucketed_row`, and the attention's length buckets): the CPU's bf16 kernels
  are cached per shape, and a flattened row of a new length each step grew the demo's training process
  from 2.2 to 3.4 GB.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from tasks.templates import IGNORE_INDEX
from tasks.varlen_attention import VARLEN_ATTENTION, register_varlen_attention

SHAPE_BUCKET = 64  # tokens; see bucketed_row


def sequence_starts(positions: Sequence[int]) -> list[int]:
    """Offsets where a new sample begins in a row of position ids (each sample's positions start at 0)."""
    return [index for index, position in enumerate(positions) if index == 0 or position <= positions[index - 1]]


@dataclass(frozen=True)
class FlatCollator:
    """A batch of rows (unpacked, neat-packed with position_ids, or pretraining blocks) as one unpadded row:
    transformers' DataCollatorWithFlattening over the batch's samples (each sample's first token is never a
    target: nothing before it in the sample predicts it). That collator numbers each row's positions from
    0 as one sample, so a neat-packed row is first split into its samples where its positions restart."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from transformers import DataCollatorWithFlattening

        samples = [sample for row in rows for sample in row_samples(row)]
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)(samples)


def row_samples(row: dict[str, Any]) -> list[dict[str, list[int]]]:
    """The samples of one row: the row itself, or a neat-packed row's samples; labels default to the ids
    (pretraining blocks)."""
    ids = list(row["input_ids"])
    labels = list(row.get("labels", ids))
    positions = list(row.get("position_ids", range(len(ids))))
    if not len(ids) == len(labels) == len(positions):
        raise ValueError("rows need input_ids, labels and position_ids of equal length")
    bounds = [*sequence_starts(positions), len(ids)]
    return [{"input_ids": ids[start:end], "labels": labels[start:end]} for start, end in pairwise(bounds)]


def sample_bounds(position_ids) -> dict[str, Any]:
    """The flash-attention boundary kwargs of one flattened row, from its position ids."""
    import torch

    row = position_ids[0]
    starts = torch.nonzero(row[1:] <= row[:-1]).flatten() + 1
    bounds = torch.cat([row.new_zeros(1), starts, row.new_tensor([row.numel()])]).to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


def supports_label_only_logits(model) -> bool:
    """True when the model's forward slices hidden states with a boolean `logits_to_keep` mask (transformers'
    `slice_logits_to_keep`, used by nearly every causal LM it ships)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _slices_logits(type(base))


@functools.cache
def _slices_logits(model_class: type) -> bool:
    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    module = sys.modules.get(model_class.__module__)
    try:
        return module is not None and "slice_logits_to_keep" in inspect.getsource(module)
    except (OSError, TypeError):
        return False


def label_positions(labels):
    """Next-token targets and the mask of positions that predict one (labels shifted left by one)."""
    import torch

    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    return targets, targets != IGNORE_INDEX


def token_loss(logits, targets, num_items_in_batch=None):
    """Token-mean cross-entropy, or the sum over `num_items_in_batch` tokens under gradient accumulation."""
    import torch

    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    total = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return total / num_items_in_batch


def bucketed_row(inputs: dict[str, Any], targets, keep):
    """A flattened row lengthened to a multiple of SHAPE_BUCKET tokens, with a multiple of SHAPE_BUCKET
    positions kept for the output head. The added tokens continue the last sample at its end, so causal
    attention keeps every real token's output exact; their targets are ignored by the loss.

    Why: the CPU's bf16 matmul kernels (oneDNN) are built and cached once per shape. A flattened row has a
    new length every step, so each step paid for new kernels and the cache grew the process by ~15 MB a
    step; with lengths on a 64-token grid a run sees a few dozen shapes, for at most 2 x 63 extra tokens."""
    import torch

    length, kept = inputs["input_ids"].shape[1], int(keep.sum())
    kept_extra = -kept % SHAPE_BUCKET
    extra = kept_extra + (-(length + kept_extra) % SHAPE_BUCKET)
    if not extra:
        return inputs, targets, keep
    positions = inputs["position_ids"]
    grown = dict(inputs)
    grown["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"].new_zeros(1, extra)], dim=1)
    grown["position_ids"] = torch.cat([positions, positions[:, -1:] + torch.arange(1, extra + 1,
                                                                                  device=positions.device)], dim=1)
    targets = torch.cat([targets, targets.new_full((1, extra), IGNORE_INDEX)], dim=1)
    added = keep.new_zeros(1, extra)  # on the batch's device: the Trainer has moved the batch there
    added[:, :kept_extra] = True
    return grown, targets, torch.cat([keep, added], dim=1)


def bucketed_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """`bucketed_row` for a row read from its hidden states, not through the output head (no targets)."""
    import torch

    nothing = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    grown, _, _ = bucketed_row(dict(inputs), torch.full_like(inputs["input_ids"], IGNORE_INDEX), nothing)
    return grown


def label_logits(model, batch: dict[str, Any]):
    """Logits at the positions that predict a label, and those labels, for one padded or flattened batch.
    The labels returned may include ignored ones (IGNORE_INDEX) where a flattened row was bucketed."""
    inputs = dict(batch)
    targets, keep = label_positions(inputs.pop("labels"))
    if inputs.get("position_ids") is not None and inputs["position_ids"].shape[0] == 1:
        if inputs.get("attention_mask") is None:  # a flattened row (a padded batch of one keeps its shape)
            inputs, targets, keep = bucketed_row(inputs, targets, keep)
        inputs |= sample_bounds(inputs["position_ids"])
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    return logits.reshape(-1, logits.shape[-1]), targets[keep]


def label_token_logps(model, inputs: dict[str, Any], labels, label_only: bool):
    """Per-token log-probs of the label tokens and their mask, as `token_logps` gives them for a padded batch:
    one row per sequence, position p holding the log-prob of token p + 1 (the preference losses' input).

    With label_only the output head runs only at positions that predict a label, as `label_logits` does for
    the train stage's loss: the full-vocabulary logits of every prompt and pad position were most of a
    preference step's memory. A flattened batch (`position_ids`, no attention mask) needs it; its log-probs
    are laid out by sequence and position as the padded batch's would be."""
    import torch

    from tasks.preference_losses import token_logps

    if not label_only:
        return token_logps(model(**inputs, use_cache=False).logits, labels)
    logits, targets = label_logits(model, {**inputs, "labels": labels})
    kept = torch.gather(logits.float().log_softmax(-1), 1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    keep = label_positions(labels)[1]  # the positions label_logits kept, in order (row-major)
    if "position_ids" not in inputs:
        mask = keep[:, :-1]  # the last position predicts nothing
        return kept.new_zeros(mask.shape).masked_scatter(mask, kept), mask
    positions, keep = inputs["position_ids"][0], keep[0]  # bucketing adds ignored positions after the row's
    sequence = torch.cumsum(positions == 0, 0) - 1
    at = (sequence[keep], positions[keep])
    shape = (int(sequence[-1]) + 1, int(positions.max()))  # sequences x (longest - 1), as token_logps gives
    mask = torch.zeros(shape, dtype=torch.bool, device=kept.device)
    mask[at] = True
    return kept.new_zeros(shape).index_put(at, kept[: len(at[0])]), mask


def trainer_class():
    """A transformers Trainer whose loss computes logits at label positions only (when the model can)."""
    from transformers import Trainer

    from tasks.optimizers import LowRankWeightDecay, SparseGradClipping

    class LabelOnlyLossTrainer(LowRankWeightDecay, SparseGradClipping, Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not supports_label_only_logits(self.accelerator.unwrap_model(model)):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = token_loss(*label_logits(model, inputs), num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss scales the model's loss
            return loss

    return LabelOnlyLossTrainer


def flat_batches_supported(model) -> bool:
    """Flattened batches need a model whose masks follow position_ids (every model transformers ships
    builds them with masking_utils); remote-code models keep padded batches."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.models.")


def use_varlen_attention(model) -> None:
    """Swap SDPA for its per-sample form (a no-op for other attention implementations: flash-attention
    reads the same boundaries itself, eager masks them from position_ids)."""
    if model.config._attn_implementation == "sdpa":
        register_varlen_attention()
        model.set_attn_implementation(VARLEN_ATTENTION)


def restore_attention(model) -> None:
    """Put back SDPA, which use_varlen_attention swapped out, before the model is saved or reused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation == VARLEN_ATTENTION:
        base.set_attn_implementation("sdpa")
