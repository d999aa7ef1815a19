"""Reward stage (rm): a pairwise reward model, trained with TRL's RewardTrainer on unpadded pair batches
(tasks.reward_trainer).

The model is the base as a sequence classifier with one output (its `score` head reads the last
non-pad token), LoRA or full or freeze tuned; the loss is -log sigmoid(r_chosen - r_rejected). The
artifact holds the adapter (or weights) and the head as `value_head.safetensors`, so PPO can load
the reward adapter and head onto its own copy of the base (model sharing). Pairwise accuracy and
margin on the validation pairs are reported.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.hardware import torch_dtype
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, Step
from tasks.optimizers import optimizer_libraries
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
    save_weights,
    starting_adapter,
)

VALUE_HEAD = "value_head.safetensors"


class RewardModelConfig(TrainingConfig):
    """TrainingConfig as it is: a reward model has no options of its own."""


def plan(recipe: Recipe, tokenized: Step, model: Step, adapter: Step | None = None) -> Step:
    inputs = {"data": tokenized, "model": model, **({"adapter": adapter} if adapter else {})}
    return STAGE.step("reward", RewardModelConfig(**training_values(recipe)), inputs, training_locators(recipe))


def load_classifier(model_dir: Path, config: TrainingConfig, pad_token_id: int, trust_remote_code: bool = False):
    """The base as a one-output sequence classifier (a new score head, seeded)."""
    from transformers import AutoModelForSequenceClassification

    from tasks.quantization import quantized_loading
    from tasks.train_methods import load_dtype

    kwargs = {"num_labels": 1, "attn_implementation": config.attn_implementation,
              "trust_remote_code": trust_remote_code}
    kwargs |= quantized_loading(config.quantization, config.precision)
    if dtype := load_dtype(config):
        kwargs["dtype"] = torch_dtype(dtype)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
    model.config.pad_token_id = pad_token_id  # the head pools the last token before padding
    model.name_or_path = model.config._name_or_path = ""  # keep the store path out of the saved adapter
    return model


def score_head(model):
    """The trained score head (nn.Linear), whether PEFT keeps it as a module to save or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.score
    if hasattr(head, "modules_to_save"):  # PEFT's trainable copy of a module
        head = head.modules_to_save[head.active_adapters[0]]
    return head


def whole_weight(weight):
    """A weight as one fp32 CPU tensor; under DeepSpeed ZeRO-3, gathered from the ranks' slices (every rank
    must call this)."""
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().float().cpu().clone()
    return weight.detach().float().cpu().contiguous()


def build(config: RewardModelConfig, ctx: BuildContext, out: Path) -> Built:
    from tasks.launch import launch_ranks

    if (launched := launch_ranks(config, ctx, out)) is not None:  # several ranks: torchrun runs this build
        return launched
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from tasks.lean_training import restore_attention
    from tasks.reward_trainer import FlatRewardTrainer, pair_collator

    data = ctx.inputs["data"]
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    model = load_classifier(model_dir, config, tokenizer.pad_token_id, **remote)
    model = attach_trainable(model, config, starting_adapter(ctx), task_type="SEQ_CLS",
                             train_embeddings=grown_vocabulary(ctx))
    cast_frozen_weights_for_autocast(model, config)
    arguments = RewardConfig(**arguments_values(config, ctx.staging), max_length=None, center_rewards_coefficient=None)
    pairs = load_rows(data.part("eval_pairs")) if data.has("eval_pairs") else None
    trainer = FlatRewardTrainer(model=model, args=arguments, processing_class=tokenizer,
                                data_collator=pair_collator(model), train_dataset=load_rows(data.part("train")),
                                eval_dataset=pairs, callbacks=[run_callback(ctx.run.mlflow_run_id)],
                                **trainer_hooks(config, arguments))
    summary = run_trainer(trainer, config, ctx, out)
    if pairs is not None:
        scores = trainer.evaluate()
        summary |= {"eval_accuracy": scores["eval_accuracy"], "eval_margin": scores["eval_margin"]}
        ctx.log.info("reward model on %d validation pairs: accuracy %.3f, margin %.3f", len(pairs),
                     scores["eval_accuracy"], scores["eval_margin"])
    restore_attention(trainer.model)
    head = whole_weight(score_head(trainer.model).weight)  # before save_weights: every rank takes part
    weights = save_weights(trainer.model, tokenizer, config, out)
    save_file({"weight": head}, str(out / VALUE_HEAD))
    write_results(summary, ctx, out, trainer.state.log_history, config.plot_loss)
    layout = {weights: weights, "value_head": VALUE_HEAD, **REPORTS}
    return Built("reward_model", layout, {**summary, "weights": weights}, reports=tuple(REPORTS))


STAGE = Stage(
    name="reward",
    plan=plan,
    build=build,
    code=("tasks.reward", "tasks.reward_trainer", "tasks.lean_training", "tasks.varlen_attention", "tasks.train_common",
          "tasks.train_methods", "tasks.quantization", "tasks.core.mapped_weights", "tasks.train_checkpoints",
          "tasks.optimizers", "tasks.muon", "tasks.launch"),
    libraries=("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"),
    config_libraries=optimizer_libraries,
    heavy=True,
)
