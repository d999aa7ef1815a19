"""The training side of the preference stage (tasks.preference): batches of pairs or of KTO feedback, the Trainer
subclass that computes LlamaFactory's preference losses on them, and the reference model.

Kept apart from the stage's plan so that planning a recipe, which imports every stage, does not import torch.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer

from tasks.core.hardware import place_on_compute_device
from tasks.core.loading import remote_code
from tasks.core.stage import BuildContext
from tasks.eval_passes import padded_batch
from tasks.lean_training import (
    FlatCollator,
    flat_batches_supported,
    label_token_logps,
    supports_label_only_logits,
    use_varlen_attention,
)
from tasks.optimizers import LowRankWeightDecay, SparseGradClipping
from tasks.preference import AVERAGED, Loss, PreferenceConfig
from tasks.preference_losses import (
    dpo_loss,
    kto_loss,
    ld_logps,
    orpo_loss,
    pairwise_wins,
    sequence_logps,
    simpo_loss,
)
from tasks.quantization import quantized_loading


def sequences(ids: list[list[int]], labels: list[list[int]], pad_token_id: int, flat: bool) -> dict[str, torch.Tensor]:
    """Sequences as one right-padded batch (the evaluation's `padded_batch`), or (flat) as one unpadded row with
    position_ids restarting per sequence (tasks.lean_training's FlatCollator: no pad tokens computed, no
    attention across sequences)."""
    samples = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels, strict=True)]
    return (FlatCollator() if flat else padded_batch(pad_token_id))(samples)


@dataclass(frozen=True)
class PairCollator:
    """A batch of pairs as one batch of sequences: the chosen ones first, then the rejected ones."""

    pad_token_id: int
    flat: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return sequences(ids, labels, self.pad_token_id, self.flat)


@dataclass(frozen=True)
class FeedbackCollator:
    """KTO rows and their mismatched KL rows, each a batch of sequences, with the desirable/undesirable labels."""

    pad_token_id: int
    flat: bool = False

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for prefix in ("", "kl_"):
            group = sequences([r[f"{prefix}input_ids"] for r in rows], [r[f"{prefix}labels"] for r in rows],
                              self.pad_token_id, self.flat)
            batch |= {f"{prefix}{key}": value for key, value in group.items()}
        batch["kto_tag"] = torch.tensor([bool(r["kto_tag"]) for r in rows])
        return batch


class PreferenceTrainer(LowRankWeightDecay, SparseGradClipping, Trainer):
    """A Trainer whose loss is a preference loss over the pair (or feedback) batches of the collators above."""

    # The loss is a batch mean: Trainer divides it by the accumulated batches. (The batches carry `labels`,
    # so Trainer would otherwise take it as already scaled by num_items_in_batch, as LlamaFactory's DPO and
    # KTO trainers also tell it not to.)
    loss_is_scaled_for_ga = False

    def __init__(self, loss: Loss, reference_model, **kwargs):
        from trl.trainer.utils import disable_dropout_in_model

        super().__init__(**kwargs)
        # As LlamaFactory's DPO and KTO trainers: no dropout (lora_dropout included), so the policy's log-probs are
        # not noisier than the reference's (the same model with its adapters off).
        disable_dropout_in_model(self.model)
        self.loss_settings = loss
        if reference_model is not None and self.is_deepspeed_enabled and not getattr(reference_model,
                                                                                      "is_quantized", False):
            from trl.models.utils import prepare_deepspeed

            # Under ZeRO-3 it loaded partitioned, as the policy did: an inference engine gathers its weights
            # (ZeRO-3) or holds them whole (other stages), as LlamaFactory and TRL prepare a reference model.
            reference_model = prepare_deepspeed(reference_model, self.accelerator)
        self.reference_model = reference_model
        self.stored: dict[str, list[float]] = defaultdict(list)

    @contextmanager
    def reference(self, model):
        """The reference's forward: a separate frozen model, or this one with its adapters disabled."""
        with torch.no_grad():
            if self.reference_model is not None:
                yield self.reference_model
            else:
                with self.accelerator.unwrap_model(model).disable_adapter():  # not DDP's: it has none
                    yield model

    def sequence_logps(self, model, batch, prefix: str = "", with_ld: bool = False):
        """Each sequence's log-prob of its labels as the loss wants it (sum, LD-weighted sum, or per-token average),
        and the per-token average (for the SFT term)."""
        inputs = {key: batch[f"{prefix}{key}"] for key in ("input_ids", "attention_mask", "position_ids")
                  if f"{prefix}{key}" in batch}
        flat = "position_ids" in inputs  # use_flat_batches made sure every model here can take those
        label_only = flat or supports_label_only_logits(self.accelerator.unwrap_model(model))
        logps, mask = label_token_logps(model, inputs, batch[f"{prefix}labels"], label_only)
        averaged = sequence_logps(logps, mask, average=True)
        if with_ld and self.loss_settings.ld_alpha is not None:
            lengths = mask.sum(-1)  # label tokens per sequence, as LlamaFactory's valid_length
            half = lengths.shape[0] // 2
            shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
            weighted = ld_logps(logps, mask, shared, self.loss_settings.ld_alpha)
            # ipo, orpo and simpo then average over the label tokens, as LlamaFactory divides by valid_length
            return (weighted / lengths.clamp(min=1) if self.loss_settings.kind in AVERAGED else weighted), averaged
        if self.loss_settings.kind in AVERAGED:
            return averaged, averaged
        return sequence_logps(logps, mask, average=False), averaged

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        kto = self.loss_settings.kind == "kto"
        return (self.kto_losses(model, inputs) if kto else self.dpo_losses(model, inputs)).mean()

    def dpo_losses(self, model, batch) -> torch.Tensor:
        loss = self.loss_settings
        policy, averaged = self.sequence_logps(model, batch, with_ld=True)
        chosen, rejected = policy.chunk(2)
        if loss.kind == "orpo":
            losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, loss.beta)
        elif loss.kind == "simpo":
            losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, loss.beta, loss.simpo_gamma)
        else:
            with self.reference(model) as reference:
                ref_chosen, ref_rejected = self.sequence_logps(reference, batch)[0].chunk(2)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, loss.beta, loss.kind, loss.label_smoothing or 0.0)
        if loss.ftx > 0 and loss.kind != "kto_pair":  # kto_pair's losses are not per pair
            losses = losses - loss.ftx * averaged.chunk(2)[0]  # plus the chosen replies' NLL per token
        self.store(chosen_rewards, rejected_rewards, chosen, rejected, paired=True)
        return losses

    def kto_losses(self, model, batch) -> torch.Tensor:
        loss = self.loss_settings
        desirable = batch["kto_tag"]
        policy, averaged = self.sequence_logps(model, batch)
        with torch.no_grad():
            policy_kl = self.sequence_logps(model, batch, prefix="kl_")[0]
        with self.reference(model) as reference:
            ref = self.sequence_logps(reference, batch)[0]
            ref_kl = self.sequence_logps(reference, batch, prefix="kl_")[0]
        losses, chosen_rewards, rejected_rewards, kl = kto_loss(
            policy[desirable], policy[~desirable], ref[desirable], ref[~desirable], policy_kl, ref_kl,
            loss.beta, loss.desirable_weight, loss.undesirable_weight,
            across_ranks=lambda kl: self.accelerator.gather_for_metrics(kl).mean())
        if loss.ftx > 0 and desirable.any():  # scaled as LlamaFactory does: per batch, not per desirable row
            sft = -averaged[desirable].mean() * len(desirable) / desirable.sum()
            losses = losses + loss.ftx * sft / len(losses)
        self.stored["kl"].append(kl.item())
        self.store(chosen_rewards, rejected_rewards, policy[desirable], policy[~desirable], paired=False)
        return losses

    def store(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, paired: bool) -> None:
        """Keep the batch's reward and log-prob figures for the next log line: each the mean over the rows of
        every rank's batch (the Trainer logs from rank 0 only). One summed (total, count) pair per figure, so
        every rank takes part in the same collective even where its batch has no row for one (KTO, whose rows
        are not paired: no accuracy or margin)."""
        none = chosen_rewards[:0]
        figures = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                   "logps/chosen": chosen_logps, "logps/rejected": rejected_logps,
                   "rewards/accuracies": pairwise_wins(chosen_rewards, rejected_rewards) if paired else none,
                   "rewards/margins": chosen_rewards - rejected_rewards if paired else none}
        sums = torch.stack([torch.stack((v.detach().float().sum(), torch.tensor(float(v.numel()), device=v.device)))
                            for v in figures.values()])
        for name, (total, count) in zip(figures, self.accelerator.reduce(sums, "sum").tolist(), strict=True):
            if count:
                self.stored[name].append(total / count)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = {**logs, **{k: sum(v) / len(v) for k, v in self.stored.items() if v}}
        self.stored.clear()
        super().log(logs, start_time)


def use_flat_batches(model, reference) -> bool:
    """Whether the loss can run on flattened batches with label-only logits: when the policy and the reference
    model (if any) both can. Switches them to per-sample attention if so (tasks.lean_training)."""
    models = [m for m in (model, reference) if m is not None]
    flat = all(flat_batches_supported(m) and supports_label_only_logits(m) for m in models)
    for m in models if flat else ():
        use_varlen_attention(m)
    return flat


def load_reference(ctx: BuildContext, config: PreferenceConfig):
    """The frozen reference model, when it is not this model with its adapters disabled."""
    if config.reference != "model":
        return None
    from transformers import AutoModelForCausalLM

    reference_dir = ctx.inputs["reference"].part("model")

    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation,
                              **remote_code(ctx.inputs["reference"])}
    kwargs |= quantized_loading(config.reference_quantization, config.precision)
    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), **kwargs)
    place_on_compute_device(model).eval()  # the Trainer moves only the model it trains
    for param in model.parameters():
        param.requires_grad = False
    return model
