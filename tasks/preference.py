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

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, Step
from tasks.optimizers import optimizer_libraries
from tasks.quantization import QuantSettings
from tasks.rows import load_rows
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
    attach_trainable,
    cast_frozen_weights_for_autocast,
    grown_vocabulary,
    load_base,
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
                              reference_quantization=QuantSettings.of(quant, recipe.model) if mode == "model" else None)
    inputs = {"data": tokenized, "model": model, **({"adapter": adapter} if adapter else {}),
              **({"reference": reference} if mode == "model" else {})}
    return STAGE.step(f"{recipe.finetuning.stage}", config, inputs, training_locators(recipe))


def build(config: PreferenceConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoTokenizer, TrainingArguments

    from tasks.launch import launch_ranks
    from tasks.lean_training import restore_attention
    from tasks.preference_trainer import (
        FeedbackCollator,
        PairCollator,
        PreferenceTrainer,
        load_reference,
        use_flat_batches,
    )

    if (launched := launch_ranks(config, ctx, out)) is not None:  # several ranks: torchrun runs this build
        return launched
    data = ctx.inputs["data"]
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    base = load_base(model_dir, config, **remote)
    reference = load_reference(ctx, config)
    flat = use_flat_batches(base, reference)
    model = attach_trainable(base, config, starting_adapter(ctx), train_embeddings=grown_vocabulary(ctx))
    cast_frozen_weights_for_autocast(model, config)
    collator = FeedbackCollator if config.objective == "kto" else PairCollator
    arguments = TrainingArguments(**arguments_values(config, ctx.staging, unpadded=flat))
    trainer = PreferenceTrainer(
        config.loss, reference, model=model,
        args=arguments, train_dataset=load_rows(data.part("train")),
        data_collator=collator(tokenizer.pad_token_id, flat=flat), callbacks=[run_callback(ctx.run.mlflow_run_id)],
        **trainer_hooks(config, arguments))
    summary = run_trainer(trainer, config, ctx, out)
    restore_attention(trainer.model)
    weights = save_weights(trainer.model, tokenizer, config, out)
    write_results(summary, ctx, out, trainer.state.log_history, config.plot_loss)
    kind = "adapter" if weights == "adapter" else "full_weights"
    return Built(kind, {weights: weights, **REPORTS}, summary, reports=tuple(REPORTS))


STAGE = Stage(
    name="preference",
    plan=plan,
    build=build,
    code=("tasks.preference", "tasks.preference_trainer", "tasks.preference_losses", "tasks.train_common",
          "tasks.train_methods", "tasks.quantization", "tasks.core.mapped_weights", "tasks.train_checkpoints",
          "tasks.optimizers", "tasks.muon", "tasks.lean_training", "tasks.varlen_attention", "tasks.eval_passes",
          "tasks.launch"),
    libraries=("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"),
    config_libraries=optimizer_libraries,
    heavy=True,
)
