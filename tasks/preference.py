"""Preference stage (dpo, kto): train a policy on chosen/rejected pairs (DPO and its variants) or on labelled
replies (KTO), against a reference model.

The losses are LlamaFactory's (tasks.preference_losses): pref_loss sigmoid (with cDPO label smoothing),
hinge, ipo, kto_pair, orpo and simpo for dpo; KTO with its mismatched-pair KL estimate. With LoRA and no
`ref_model`, the reference is the same model with its adapters disabled: one copy of the base in
memory. TRL's DPOTrainer is not used: it has no ORPO or SimPO, ignores label smoothing for sigmoid,
applies LD-DPO's alpha to the reference too, and re-tokenizes data the tokenize stage already encoded
with the recipe's template; a small Trainer subclass computes these losses on that data instead.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, Step
from tasks.optimizers import OPTIMIZER_LIBRARIES, SparseGradClipping
from tasks.preference_losses import (
    dpo_loss,
    kto_loss,
    ld_logps,
    orpo_loss,
    pairwise_accuracy,
    sequence_logps,
    simpo_loss,
    token_logps,
)
from tasks.rows import load_rows
from tasks.templates import IGNORE_INDEX
from tasks.train_common import (
    REPORTS,
    TrainingConfig,
    arguments_values,
    run_callback,
    run_trainer,
    trainer_hooks,
    training_locators,
    training_values,
    write_results,
)
from tasks.train_methods import (
    QuantSettings,
    attach_trainable,
    grown_vocabulary,
    load_base,
    quantization_config,
    save_weights,
    starting_adapter,
)

AVERAGED = ("ipo", "orpo", "simpo")  # losses defined on per-token average log-probs
REFERENCE_FREE = ("orpo", "simpo")


class Loss(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo", "kto"]
    beta: float
    ftx: float  # weight of the SFT term on chosen (dpo) / desirable (kto) replies
    label_smoothing: float | None  # sigmoid only
    simpo_gamma: float | None  # simpo only
    ld_alpha: float | None  # LD-DPO, dpo only
    desirable_weight: float | None  # kto only
    undesirable_weight: float | None


class PreferenceConfig(TrainingConfig):
    objective: Literal["dpo", "kto"]
    loss: Loss
    reference: Literal["adapters_off", "model", "none"]  # none: orpo and simpo need no reference
    reference_quantization: QuantSettings | None


def loss_settings(recipe: Recipe) -> Loss:
    """The loss options that apply to the objective and pref_loss."""
    r, objective = recipe.rlhf, recipe.finetuning.stage
    kind = "kto" if objective == "kto" else r.pref_loss
    return Loss(kind=kind, beta=r.pref_beta, ftx=r.pref_ftx,
                label_smoothing=r.dpo_label_smoothing if kind == "sigmoid" else None,
                simpo_gamma=r.simpo_gamma if kind == "simpo" else None,
                ld_alpha=r.ld_alpha if objective == "dpo" else None,
                desirable_weight=r.kto_chosen_weight if kind == "kto" else None,
                undesirable_weight=r.kto_rejected_weight if kind == "kto" else None)


def plan(recipe: Recipe, tokenized: Step, model: Step, adapter: Step | None = None,
         reference: Step | None = None) -> Step:
    loss = loss_settings(recipe)
    if loss.kind in REFERENCE_FREE:
        mode = "none"
    else:
        mode = "model" if reference is not None else "adapters_off"
    if mode == "adapters_off" and recipe.finetuning.finetuning_type != "lora":
        mode = "model"  # full or freeze tuning changes the base itself: the reference is a frozen copy of it
        reference = model
    quant = recipe.rlhf.ref_model_quantization_bit
    config = PreferenceConfig(objective=recipe.finetuning.stage, **training_values(recipe), loss=loss, reference=mode,
                              reference_quantization=QuantSettings(bits=quant, type="nf4" if quant == 4 else None,
                                                                   double=True if quant == 4 else None)
                              if quant and mode == "model" else None)
    inputs = {"data": tokenized, "model": model, **({"adapter": adapter} if adapter else {}),
              **({"reference": reference} if mode == "model" else {})}
    return STAGE.step(f"{recipe.finetuning.stage}", config, inputs, training_locators(recipe))


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass(frozen=True)
class PairCollator:
    """A batch of pairs as one right-padded batch: the chosen sequences first, then the rejected ones."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
        return {"input_ids": pad(ids, self.pad_token_id), "attention_mask": pad([[1] * len(i) for i in ids], 0),
                "labels": pad(labels, IGNORE_INDEX)}


@dataclass(frozen=True)
class FeedbackCollator:
    """KTO rows and their mismatched KL rows, each right-padded, with the desirable/undesirable labels."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for prefix in ("", "kl_"):
            ids = [r[f"{prefix}input_ids"] for r in rows]
            batch |= {f"{prefix}input_ids": pad(ids, self.pad_token_id),
                      f"{prefix}attention_mask": pad([[1] * len(i) for i in ids], 0),
                      f"{prefix}labels": pad([r[f"{prefix}labels"] for r in rows], IGNORE_INDEX)}
        batch["kto_tag"] = torch.tensor([bool(r["kto_tag"]) for r in rows])
        return batch


def response_lengths(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum(dim=-1)


@functools.cache
def preference_trainer_class() -> type:
    """The PreferenceTrainer class (a factory: importing transformers' Trainer takes seconds, and planning
    imports this module)."""
    from transformers import Trainer

    class PreferenceTrainer(SparseGradClipping, Trainer):
        """A Trainer whose loss is a preference loss over the pair (or feedback) batches of the collators above."""

        def __init__(self, loss: Loss, reference_model, **kwargs):
            super().__init__(**kwargs)
            self.loss_settings = loss
            self.reference_model = reference_model
            self.stored: dict[str, list[float]] = defaultdict(list)

        @contextmanager
        def reference(self, model):
            """The reference's forward: a separate frozen model, or this one with its adapters disabled."""
            with torch.no_grad():
                if self.reference_model is not None:
                    yield self.reference_model
                else:
                    with model.disable_adapter():
                        yield model

        def sequence_logps(self, model, batch, prefix: str = "", with_ld: bool = False):
            """Each sequence's log-prob of its labels as the loss wants it (sum, LD-weighted sum, or per-token average),
            and the per-token average (for the SFT term)."""
            logits = model(input_ids=batch[f"{prefix}input_ids"], attention_mask=batch[f"{prefix}attention_mask"],
                           use_cache=False).logits
            logps, mask = token_logps(logits, batch[f"{prefix}labels"])
            averaged = sequence_logps(logps, mask, average=True)
            if self.loss_settings.kind in AVERAGED:
                return averaged, averaged
            if with_ld and self.loss_settings.ld_alpha is not None:
                lengths = response_lengths(batch["labels"])
                half = lengths.shape[0] // 2
                shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
                return ld_logps(logps, mask, shared, self.loss_settings.ld_alpha), averaged
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
            self.store(chosen_rewards, rejected_rewards, chosen, rejected)
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
                loss.beta, loss.desirable_weight, loss.undesirable_weight)
            if loss.ftx > 0 and desirable.any():  # scaled as LlamaFactory does: per batch, not per desirable row
                sft = -averaged[desirable].mean() * len(desirable) / desirable.sum()
                losses = losses + loss.ftx * sft / len(losses)
            self.stored["kl"].append(kl.item())
            self.store(chosen_rewards, rejected_rewards, policy[desirable], policy[~desirable])
            return losses

        def store(self, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> None:
            """Keep the batch's reward and log-prob figures for the next log line."""
            for name, values in (("rewards/chosen", chosen_rewards), ("rewards/rejected", rejected_rewards),
                                 ("logps/chosen", chosen_logps), ("logps/rejected", rejected_logps)):
                if values.numel():
                    self.stored[name].append(values.detach().float().mean().item())
            if chosen_rewards.numel() and chosen_rewards.shape == rejected_rewards.shape:
                self.stored["rewards/accuracies"].append(pairwise_accuracy(chosen_rewards, rejected_rewards).item())
                self.stored["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self.stored.items() if v}}
            self.stored.clear()
            super().log(logs, start_time)

    return PreferenceTrainer


def load_reference(ctx: BuildContext, config: PreferenceConfig):
    """The frozen reference model, when it is not this model with its adapters disabled."""
    if config.reference != "model":
        return None
    from transformers import AutoModelForCausalLM

    reference_dir = ctx.inputs["reference"].part("model")

    kwargs: dict[str, Any] = {"attn_implementation": config.attn_implementation,
                              **remote_code(ctx.inputs["reference"])}
    if quant := quantization_config(config.reference_quantization, config.precision):
        kwargs["quantization_config"] = quant
    model = AutoModelForCausalLM.from_pretrained(str(reference_dir), **kwargs)
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    return model


def build(config: PreferenceConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoTokenizer, TrainingArguments

    data = ctx.inputs["data"]
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    model = attach_trainable(load_base(model_dir, config, **remote), config, starting_adapter(ctx),
                             train_embeddings=grown_vocabulary(ctx))
    collator = FeedbackCollator if config.objective == "kto" else PairCollator
    arguments = TrainingArguments(**arguments_values(config, ctx.staging))
    trainer = preference_trainer_class()(
        config.loss, load_reference(ctx, config), model=model,
        args=arguments, train_dataset=load_rows(data.part("train")),
        data_collator=collator(tokenizer.pad_token_id), callbacks=[run_callback(ctx.run.mlflow_run_id)],
        **trainer_hooks(config, arguments))
    summary = run_trainer(trainer, config, ctx, out)
    weights = save_weights(trainer.model, tokenizer, config, out)
    write_results(summary, ctx, out, trainer.state.log_history, config.plot_loss)
    kind = "adapter" if weights == "adapter" else "full_weights"
    return Built(kind, {weights: weights, **REPORTS}, summary, reports=tuple(REPORTS))


STAGE = Stage(
    name="preference",
    plan=plan,
    build=build,
    code=("tasks.preference", "tasks.preference_losses", "tasks.train_common", "tasks.train_methods",
          "tasks.train_checkpoints", "tasks.optimizers"),
    libraries=("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", *OPTIMIZER_LIBRARIES),
    heavy=True,
)
