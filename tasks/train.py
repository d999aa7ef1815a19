"""Train stage (pt, sft): fine-tune the base checkpoint on the tokenized data (LoRA, full or freeze).

Checkpoints go to a staging directory keyed like the artifact, so a killed run resumes from the
newest complete checkpoint when the same recipe runs again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from tasks.core.errors import RecipeError
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, Step
from tasks.data_report import shuffled_padding_share
from tasks.launch import launch_ranks
from tasks.lean_training import (
    FlatCollator,
    flat_batches_supported,
    restore_attention,
    trainer_class,
    use_varlen_attention,
)
from tasks.optimizers import optimizer_libraries
from tasks.rows import load_rows
from tasks.streaming import training_stream
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


class TrainConfig(TrainingConfig):
    objective: Literal["pt", "sft"]
    shuffle_buffer: int | None  # streaming only


def plan(recipe: Recipe, tokenized: Step, model: Step, adapter: Step | None = None) -> Step:
    config = TrainConfig(objective=recipe.finetuning.stage, **training_values(recipe),
                         shuffle_buffer=recipe.data.buffer_size if recipe.data.streaming else None)
    inputs = {"data": tokenized, "model": model, **({"adapter": adapter} if adapter else {})}
    locators = {**training_locators(recipe), "sources": tokenized.locators["sources"]}
    return STAGE.step("train", config, inputs, locators)


def collator_for(data, tokenizer, model, neftune: bool = False):
    """One unpadded row per batch where the model allows it (tasks.lean_training); otherwise packed rows carry
    position_ids and need no attention mask (see tasks.packing), and others pad per batch. NEFTune's noise is
    scaled by 1/sqrt(row length): on one row of the whole batch it was sqrt(batch) times weaker than on the padded
    batches LlamaFactory trains on, so a NEFTune run pads."""
    if flat_batches_supported(model) and not neftune:
        return FlatCollator()
    if data.info.get("position_ids"):
        from tasks.packing import PackedCollator

        if not flat_batches_supported(model):  # its own code builds its masks: position_ids need not bound them
            raise RecipeError("key 'neat_packing': this model runs its own code (trust_remote_code), whose attention "
                              "is not known to keep packed samples apart; use packing: true (samples of a row see "
                              "each other, as in LlamaFactory's plain packing) or no packing")

        return PackedCollator(pad_token_id=tokenizer.pad_token_id)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def build(config: TrainConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoTokenizer, TrainingArguments

    if (launched := launch_ranks(config, ctx, out)) is not None:  # several ranks: torchrun runs this build
        return launched
    data = ctx.inputs["data"]
    model_dir = ctx.inputs["model"].part("model")
    remote = remote_code(ctx.inputs["model"])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **remote)
    base = load_base(model_dir, config, **remote)
    use_varlen_attention(base)
    model = attach_trainable(base, config, starting_adapter(ctx), train_embeddings=grown_vocabulary(ctx))
    cast_frozen_weights_for_autocast(model, config)
    collator = collator_for(data, tokenizer, model, neftune=bool(config.neftune_noise_alpha))
    flat = isinstance(collator, FlatCollator)  # no pad tokens: every token counted is a real one
    padding = None
    if data.info["train"] == "stream":  # rows are aligned and tokenized lazily as training consumes them
        spec = json.loads(data.part("stream").read_text())
        train_rows = training_stream(spec, tokenizer, ctx.locators["sources"], config.shuffle_buffer, config.seed)
    else:
        train_rows = load_rows(data.part("train"))
        lengths = [len(ids) for ids in train_rows["input_ids"]]
        padding = 0.0 if flat else shuffled_padding_share(lengths, config.batch_size, config.seed)
    arguments = TrainingArguments(**arguments_values(config, ctx.staging, unpadded=flat))
    trainer = trainer_class()(model=model, args=arguments, train_dataset=train_rows, data_collator=collator,
                              callbacks=[run_callback(ctx.run.mlflow_run_id)], **trainer_hooks(config, arguments))
    summary = run_trainer(trainer, config, ctx, out) | {"padding_share": padding}
    restore_attention(trainer.model)
    weights = save_weights(trainer.model, tokenizer, config, out)
    write_results(summary, ctx, out, trainer.state.log_history, config.plot_loss)
    kind = "adapter" if weights == "adapter" else "full_weights"
    patches = {"upcast": list(config.upcast)} if config.upcast else {}
    return Built(kind, {weights: weights, **REPORTS}, summary | patches, reports=tuple(REPORTS))


STAGE = Stage(
    name="train",
    plan=plan,
    build=build,
    code=("tasks.train", "tasks.train_common", "tasks.train_methods", "tasks.quantization", "tasks.core.mapped_weights",
          "tasks.train_checkpoints", "tasks.packing", "tasks.streaming", "tasks.encoding", "tasks.formats",
          "tasks.lean_training", "tasks.varlen_attention", "tasks.optimizers", "tasks.muon", "tasks.launch"),
    libraries=("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets"),
    config_libraries=optimizer_libraries,
    heavy=True,
)
