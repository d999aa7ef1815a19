"""Train stage: fine-tune the base checkpoint on the tokenized data (LoRA, full or freeze).

Checkpoints go to a staging directory keyed like the artifact, so a killed run resumes from the
newest complete checkpoint when the same recipe runs again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core import tracking
from tasks.core.hardware import attn_implementation, has_cuda, mixed_precision, torch_dtype
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec
from tasks.streaming import training_stream

STAGE = "train"
CHECKPOINT_PREFIX = "checkpoint-"


def plan(recipe, tokenized: StageSpec, model: StageSpec) -> StageSpec:
    t = recipe.training
    config = {
        **recipe.slice_for(STAGE),
        "precision": mixed_precision(t.bf16, t.fp16),
        "attn_implementation": attn_implementation(recipe.model.flash_attn),
    }
    return make_spec(
        STAGE,
        "train",
        config,
        {"data": tokenized, "model": model},
        ["tasks.train", "tasks.packing", "tasks.streaming", "tasks.encoding", "tasks.formats"],
        ("torch", "transformers", "peft", "accelerate", "bitsandbytes"),
    )


def latest_complete_checkpoint(staging: Path) -> Path | None:
    """Newest checkpoint-N holding trainer_state.json (the Trainer writes it last); drop torn ones."""
    complete = []
    for path in staging.glob(f"{CHECKPOINT_PREFIX}*"):
        if (path / "trainer_state.json").is_file():
            complete.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)  # killed while saving: never resume from it
    return max(complete, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def quantization_config(config: dict[str, Any]):
    if not config["quantization_bit"]:
        return None
    from transformers import BitsAndBytesConfig

    if config["quantization_bit"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config["quantization_type"],
        bnb_4bit_use_double_quant=config["double_quantization"],
        bnb_4bit_compute_dtype=torch_dtype("bfloat16" if config["precision"] == "bf16" else "float32"),
    )


def load_base(model_dir: Path, config: dict[str, Any]):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"attn_implementation": config["attn_implementation"]}
    if quant := quantization_config(config):
        kwargs["quantization_config"] = quant
    if config["precision"] == "fp32":
        kwargs["dtype"] = torch_dtype("float32")
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)


def lora_targets(value: str) -> str | list[str]:
    """PEFT target_modules for the recipe's lora_target: every linear layer but the head, or names."""
    return "all-linear" if value.strip() == "all" else [name.strip() for name in value.split(",") if name.strip()]


def attach_trainable(model, config: dict[str, Any]):
    """Wrap or unfreeze the model according to finetuning_type; returns the model to train."""
    import torch

    kind = config["finetuning_type"]
    if kind == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if config["quantization_bit"]:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config["lora_rank"],
            lora_alpha=config["lora_alpha"] or config["lora_rank"] * 2,
            lora_dropout=config["lora_dropout"],
            target_modules=lora_targets(config["lora_target"]),
            use_dora=config["use_dora"],
            use_rslora=config["use_rslora"],
        )
        model = get_peft_model(model, lora)
        for param in model.parameters():  # adapters train in fp32 even on a half-precision base
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
        return model
    if kind == "freeze":
        layers = model.config.num_hidden_layers
        count = config["freeze_trainable_layers"]
        chosen = range(layers - count, layers) if count > 0 else range(-count)
        names = {f".layers.{i}." for i in chosen}
        for name, param in model.named_parameters():
            param.requires_grad = any(tag in name for tag in names)
    return model


def mlflow_step_logger(run_id: str | None):
    """A Trainer callback sending each log (loss, learning rate, grad norm) to the stage's MLflow run."""
    from transformers import TrainerCallback

    class MlflowStepLogger(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if run_id and state.is_world_process_zero and logs:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                tracking.log_metrics(run_id, numbers, step=state.global_step)

    return MlflowStepLogger()


def training_arguments(config: dict[str, Any], staging: Path, runtime: Runtime):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(staging),
        per_device_train_batch_size=config["per_device_train_batch_size"],
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        learning_rate=config["learning_rate"],
        num_train_epochs=config["num_train_epochs"],
        max_steps=config["max_steps"],
        lr_scheduler_type=config["lr_scheduler_type"],
        # transformers 5 takes a ratio as a float warmup_steps in [0, 1); explicit steps win, as in LlamaFactory.
        warmup_steps=config["warmup_steps"] or config["warmup_ratio"],
        weight_decay=config["weight_decay"],
        max_grad_norm=config["max_grad_norm"],
        optim=config["optim"],
        seed=config["seed"],
        bf16=config["precision"] == "bf16",
        fp16=config["precision"] == "fp16",
        use_cpu=not has_cuda(),
        logging_steps=runtime.logging_steps,
        save_strategy="steps",
        save_steps=runtime.save_steps,
        save_total_limit=runtime.save_total_limit,
        report_to=runtime.report_to or "none",
        activation_checkpointing=runtime.gradient_checkpointing,  # transformers 5 name for it
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=runtime.dataloader_num_workers,
        save_only_model=runtime.save_only_model,
        ddp_timeout=runtime.ddp_timeout,
    )


def collator_for(rows, tokenizer):
    """Packed rows carry position_ids and need no attention mask (see tasks.packing); others pad per batch."""
    if "position_ids" in (rows.column_names or []):
        from tasks.packing import PackedCollator

        return PackedCollator(pad_token_id=tokenizer.pad_token_id)
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer, Trainer

    model_dir = ctx.inputs["model"] / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = attach_trainable(load_base(model_dir, config), config)
    if ctx.runtime.gradient_checkpointing and config["finetuning_type"] == "lora":
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input
    stream_file = ctx.inputs["data"] / "stream.json"
    if stream_file.exists():  # streaming: rows are aligned and tokenized lazily as training consumes them
        train_rows = training_stream(json.loads(stream_file.read_text()), tokenizer)
    else:
        train_rows = datasets.load_from_disk(str(ctx.inputs["data"] / "train"))
    staging = ctx.staging
    explicit = ctx.runtime.resume_from_checkpoint
    resume = Path(explicit) if explicit else latest_complete_checkpoint(staging)
    trainer = Trainer(
        model=model,
        args=training_arguments(config, staging, ctx.runtime),
        train_dataset=train_rows,
        data_collator=collator_for(train_rows, tokenizer),
        callbacks=[mlflow_step_logger(ctx.runtime.mlflow_run_id)],
    )
    resumed_state = json.loads((resume / "trainer_state.json").read_text()) if resume else {}
    resumed_step = resumed_state.get("global_step", 0)
    tokens_before = resumed_state.get("num_input_tokens_seen", 0)  # throughput counts this run's tokens only
    if resume:
        ctx.log.info("resuming training from %s", resume.name)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - started
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    weights_dir = out / ("adapter" if config["finetuning_type"] == "lora" else "model")
    trainer.model.save_pretrained(str(weights_dir))
    if config["finetuning_type"] != "lora":
        tokenizer.save_pretrained(str(weights_dir))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_step,
        "train_loss": result.training_loss,
        "train_seconds": round(seconds, 2),
        "tokens_trained": int(tokens),
        "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    (out / "train_results.json").write_text(json.dumps(summary, indent=2))
    ctx.log_metrics({k: v for k, v in summary.items() if k != "resumed_from_step"})
    if ctx.runtime.plot_loss and ctx.runtime.mlflow_run_id:
        plot_loss(trainer.state.log_history, ctx.runtime.mlflow_run_id)
    ctx.log.info(
        "trained %d steps (resumed at %d), %.1f tokens/s",
        summary["global_step"],
        resumed_step,
        summary["tokens_per_second"],
    )
    return {"train": summary}


def plot_loss(history: list[dict[str, Any]], run_id: str) -> None:
    """Attach a training-loss curve to the MLflow run (LlamaFactory's plot_loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([s for s, _ in points], [v for _, v in points])
    axis.set(xlabel="step", ylabel="loss", title="training loss")
    tracking.client().log_figure(run_id, figure, "training_loss.png")
    plt.close(figure)


@task(name="train", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def train_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
