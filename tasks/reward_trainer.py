"""The training side of the rm stage (tasks.reward): TRL's RewardTrainer on unpadded pair batches.

TRL pads a batch's chosen and rejected sequences to the longest of them: a quarter of the tokens of the
bundled pairs' batches were padding, each computed through every layer. Here a batch is one row of its
sequences end to end (`FlatPairCollator`, chosen first as TRL lays them out), attended sample by sample
(tasks.varlen_attention), as the sft and preference stages train. The classifier pools one token per row,
so a flattened row's rewards are read from its score head's output at each sequence's pooled token: the
last token that is not the pad token, the token the classifier pools in a padded batch. The loss and the
logged figures are TRL's. Models whose masks may not follow position_ids (remote code) keep TRL's padded
batches, and so does ZeRO-3 (see `pair_collator`).

Kept apart from the stage's plan so that planning a recipe, which imports every stage, does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorWithFlattening
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardTrainer

from tasks.lean_training import bucketed_inputs, flat_batches_supported, sample_bounds, use_varlen_attention
from tasks.optimizers import LowRankWeightDecay, SparseGradClipping
from tasks.reward import score_head


@dataclass(frozen=True)
class FlatPairCollator:
    """A batch of pairs as one unpadded row: the chosen sequences, then the rejected ones, end to end, with
    position_ids restarting per sequence (transformers' DataCollatorWithFlattening)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        samples = [{"input_ids": r["chosen_ids"]} for r in rows] + [{"input_ids": r["rejected_ids"]} for r in rows]
        batch = DataCollatorWithFlattening(return_position_ids=True)(samples)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}


def pooled_positions(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """For each sequence of a flattened row, the position of its last token that is not the pad token (its
    first token where all are), as the classifier pools each row of a right-padded batch."""
    row, positions = input_ids[0], position_ids[0]
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions[1:] <= positions[:-1]
    sequence = starts.cumsum(0) - 1  # which sequence each position belongs to
    index = torch.arange(len(row), device=row.device)
    first = index[starts][sequence]  # each position's sequence start
    candidate = torch.where(row != pad_token_id, index, first)
    return torch.full((int(starts.sum()),), -1, device=row.device).scatter_reduce(0, sequence, candidate, "amax")


def flat_rewards(model, score: torch.nn.Module, batch: dict[str, torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Each sequence's reward from one forward of the flattened row, read from the score head's output (the
    forward goes through the model as the Trainer holds it, so DDP and DeepSpeed see it). The row is lengthened
    to the shape grid (`bucketed_row`); the filler comes after every pooled position and causal attention
    keeps it out of them."""
    pooled = pooled_positions(batch["input_ids"], batch["position_ids"], pad_token_id)
    inputs = bucketed_inputs(batch)
    scores: list[torch.Tensor] = []
    hook = score.register_forward_hook(lambda module, args, output: scores.append(output))
    try:
        model(**inputs, **sample_bounds(inputs["position_ids"]), use_cache=False)
    finally:
        hook.remove()
    return scores[0][0, pooled, 0]


class FlatRewardTrainer(LowRankWeightDecay, SparseGradClipping, RewardTrainer):
    """RewardTrainer whose flattened batches (FlatPairCollator) are scored by `flat_rewards`; its loss and
    figures as RewardTrainer.compute_loss gives them, but for accuracy and margin: those are kept per pair
    (`record_pairs`). A padded batch goes to RewardTrainer as it is."""

    def record_pairs(self, mode: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Accuracy and margin as one entry per pair. TRL appends one mean per batch and logs the mean of the
        entries, so a short last batch weighed as much as a full one; the share of pairs ranked right is what
        LlamaFactory's ComputeAccuracy reports."""
        pairs = self.accelerator.gather_for_metrics(torch.stack([chosen, rejected], -1).detach().float())
        self._metrics[mode]["accuracy"].extend((pairs[:, 0] > pairs[:, 1]).float().tolist())
        self._metrics[mode]["margin"].extend((pairs[:, 0] - pairs[:, 1]).tolist())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if "position_ids" not in inputs:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            for name in ("accuracy", "margin"):
                self._metrics[mode][name].pop()  # the batch's mean, replaced by its pairs
            self.record_pairs(mode, *outputs.logits.squeeze(-1).chunk(2))
            return (loss, outputs) if return_outputs else loss
        rewards = flat_rewards(model, score_head(self.accelerator.unwrap_model(model)), inputs,
                               self.processing_class.pad_token_id)
        chosen, rejected = rewards.chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        if mode == "train":
            tokens = torch.tensor(inputs["input_ids"].shape[1], device=rewards.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            gathered = self.accelerator.gather(rewards.detach())
            self._metrics[mode]["min_reward"].append(gathered.min().item())
            self._metrics[mode]["mean_reward"].append(gathered.mean().item())
            self._metrics[mode]["max_reward"].append(gathered.max().item())
        self.record_pairs(mode, chosen, rejected)
        return (loss, SequenceClassifierOutput(loss=loss, logits=rewards.unsqueeze(-1))) if return_outputs else loss


def pair_collator(model) -> FlatPairCollator | None:
    """The flattened-pair collator, with per-sample attention switched on, where the model can take flattened
    batches; None (TRL's padded batches) where it cannot, and under DeepSpeed ZeRO-3, whose backward hooks
    expect the loss to come from the model's output, not from a module's inside it."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not flat_batches_supported(model) or is_deepspeed_zero3_enabled():
        return None
    use_varlen_attention(model)
    return FlatPairCollator()
