"""What every training objective shares: the typed method/optimizer/schedule config, the Trainer's arguments,
resuming from staged checkpoints, the per-step MLflow callback, and the results a training artifact reports.

The objectives' stages (train: pt/sft, reward: rm, preference: dpo/kto, ppo) each extend `TrainingConfig`
with their own options and build their own trainer; `run_trainer` runs any transformers Trainer the same way.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.core import tracking
from tasks.core.errors import RecipeError
from tasks.core.hardware import attn_implementation, has_cuda, training_precision
from tasks.core.hashing import tree_digest
from tasks.core.memory import trim_heap
from tasks.core.recipe import Recipe, report_targets
from tasks.core.stage import BuildContext, StageConfig, check_stop, unkeyed
from tasks.optimizers import OptimizerSettings, low_rank_arguments, optimizer_settings, trainer_optimizer
from tasks.quantization import QuantSettings
from tasks.train_checkpoints import checkpoint_problem, latest_usable_checkpoint
from tasks.train_methods import FreezeSettings, LoraSettings, split_names


class Schedule(BaseModel):
    model_config = ConfigDict(frozen=True)

    epochs: float | None  # None when max_steps decides
    max_steps: int | None
    lr_scheduler_type: str
    lr_scheduler_kwargs: dict[str, Any] | None = None
    warmup_steps: int | None  # explicit steps win over the ratio, as in LlamaFactory
    warmup_ratio: float | None


class Launch(BaseModel):
    """How many ranks train and how they share the work; keyed, since each changes the numbers a little."""

    model_config = ConfigDict(frozen=True)

    world_size: int  # nproc_per_node x nnodes
    deepspeed: dict[str, Any] | None  # the DeepSpeed config file's content (not its path)
    fsdp: str | None
    fsdp_config: dict[str, Any] | None


class TrainingConfig(StageConfig):
    """The options every objective trains with; the stages' configs add their own."""

    finetuning_type: Literal["lora", "full", "freeze"]
    lora: LoraSettings | None
    freeze: FreezeSettings | None
    quantization: QuantSettings | None
    precision: Literal["fp32", "bf16", "fp16", "pure_bf16"]  # resolved against the hardware
    optimizer: OptimizerSettings | None  # a use_* optimizer (or LoRA+) instead of `optim` as named
    neftune_noise_alpha: float | None
    liger_kernel: bool
    launch: Launch
    attn_implementation: str | None  # None: transformers chooses
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    schedule: Schedule
    weight_decay: float
    max_grad_norm: float
    optim: str
    seed: int
    save_only_model: bool  # a resume without optimizer state trains differently
    resume_from: str | None  # content digest of an explicit resume_from_checkpoint
    upcast: tuple[str, ...] = ()  # upcast_layernorm / upcast_lmhead_output: "layernorm", "lmhead_output"
    logging_steps: int = unkeyed(10)
    save_steps: int = unkeyed(500)
    save_total_limit: int | None = unkeyed(None)
    report_to: tuple[str, ...] = unkeyed(())
    plot_loss: bool = unkeyed(False)
    dataloader_num_workers: int = unkeyed(0)
    ddp_timeout: int = unkeyed(1800)
    gradient_checkpointing: bool = unkeyed(True, "recomputes activations; the same result with less memory")
    badam_verbose: int = unkeyed(0)
    nproc_per_node: int = unkeyed(1, "processes on this machine")
    nnodes: int = unkeyed(1)
    node_rank: int = unkeyed(0)
    master_addr: str = unkeyed("127.0.0.1")
    master_port: int | None = unkeyed(None)


def schedule(recipe: Recipe) -> Schedule:
    t = recipe.training
    by_steps = t.max_steps > 0
    return Schedule(
        epochs=None if by_steps else t.num_train_epochs,
        max_steps=t.max_steps if by_steps else None,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=t.lr_scheduler_kwargs or None,
        warmup_steps=t.warmup_steps or None,
        warmup_ratio=t.warmup_ratio if not t.warmup_steps and t.warmup_ratio else None,
    )


def method_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings of the chosen finetuning_type only: options of other methods change nothing."""
    f, m = recipe.finetuning, recipe.model
    lora = freeze = None
    if f.finetuning_type == "lora":
        lora = LoraSettings(rank=f.lora_rank, alpha=f.lora_alpha or f.lora_rank * 2, dropout=f.lora_dropout,
                            target=f.lora_target, use_dora=f.use_dora, use_rslora=f.use_rslora,
                            additional_target=split_names(f.additional_target),
                            pissa_iter=f.pissa_iter if f.pissa_init else None,
                            create_new_adapter=f.create_new_adapter)
    if f.finetuning_type == "freeze":
        freeze = FreezeSettings(trainable_layers=f.freeze_trainable_layers,
                                trainable_modules=split_names(f.freeze_trainable_modules) or ("all",),
                                extra_modules=split_names(f.freeze_extra_modules))
    quant = QuantSettings.of(m.quantization_bit, m)
    return {"lora": lora, "freeze": freeze, "quantization": quant}


def training_values(recipe: Recipe) -> dict[str, Any]:
    """TrainingConfig's fields from a recipe, resolved against the hardware."""
    t = recipe.training
    resume = t.resume_from_checkpoint
    if resume and not Path(resume).is_dir():
        raise RecipeError(f"key 'resume_from_checkpoint': {resume} is not a checkpoint folder")
    return {
        "finetuning_type": recipe.finetuning.finetuning_type,
        **method_settings(recipe),
        "precision": precision(recipe),
        "optimizer": optimizer_settings(recipe),
        "neftune_noise_alpha": t.neftune_noise_alpha,
        "liger_kernel": liger_kernel(recipe.model.enable_liger_kernel),
        "attn_implementation": attn_implementation(recipe.model.flash_attn),
        "batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "schedule": schedule(recipe),
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": t.optim,
        "seed": t.seed,
        "save_only_model": t.save_only_model,
        "resume_from": tree_digest(Path(resume)) if resume else None,
        "upcast": tuple(n for n, on in (("layernorm", recipe.model.upcast_layernorm),
                                        ("lmhead_output", recipe.model.upcast_lmhead_output)) if on),
        "logging_steps": t.logging_steps,
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "report_to": tuple(report_targets(t.report_to)),
        "plot_loss": t.plot_loss,
        "dataloader_num_workers": t.dataloader_num_workers,
        "ddp_timeout": t.ddp_timeout,
        "gradient_checkpointing": not t.disable_gradient_checkpointing,
        "badam_verbose": recipe.finetuning.badam_verbose,
        "launch": launch(recipe),
        "nproc_per_node": processes_per_node(t.nproc_per_node, recipe.finetuning.stage),
        "nnodes": t.nnodes,
        "node_rank": t.node_rank,
        "master_addr": t.master_addr,
        "master_port": t.master_port,
    }


def processes_per_node(asked: int | None, objective: str = "sft") -> int:
    """Training processes on this machine: as asked, else one per visible GPU (one on a CPU, and for ppo,
    whose loop is not the Trainer's and trains in one process)."""
    if asked is not None:
        return asked
    if objective == "ppo" or not has_cuda():
        return 1
    import torch

    return torch.cuda.device_count()


def json_file(key: str, path: str | None) -> dict[str, Any] | None:
    """A JSON config file's content, for the key (its bytes shape the run, its path does not)."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"key '{key}': {path} is not a readable JSON file ({type(exc).__name__})") from None


def launch(recipe: Recipe) -> Launch:
    t = recipe.training
    if t.fsdp and not has_cuda():  # accelerate would quietly fall back to plain data parallel on CPU ranks
        raise RecipeError("key 'fsdp': accelerate shards with FSDP on GPUs only; on a CPU use 'deepspeed'")
    return Launch(world_size=processes_per_node(t.nproc_per_node, recipe.finetuning.stage) * t.nnodes,
                  deepspeed=json_file("deepspeed", t.deepspeed), fsdp=t.fsdp or None,
                  fsdp_config=json_file("fsdp_config", t.fsdp_config))


def precision(recipe: Recipe) -> str:
    """The recipe's training precision on this machine (fp32, bf16, fp16 or pure_bf16)."""
    return training_precision(recipe.finetuning.pure_bf16, recipe.training.bf16, recipe.training.fp16)


def liger_kernel(enabled: bool) -> bool:
    """Liger's Triton kernels: on only where they can run (a CUDA GPU and the liger-kernel package)."""
    if enabled and not (has_cuda() and importlib.util.find_spec("liger_kernel")):
        raise RecipeError("key 'enable_liger_kernel': needs a CUDA GPU and the liger-kernel package; set it false")
    return enabled


def training_locators(recipe: Recipe) -> dict[str, Any]:
    return {"resume_from_checkpoint": recipe.training.resume_from_checkpoint or ""}


# Why trim: a step's activations come and go in sizes that change with each batch, and glibc keeps the
# freed pages: in 30 steps of the demo's step the heap held 500-600 MiB more than its tensors used at the
# peak. Trimming every 4 steps cut the demo's peak RSS by 87-121 MB at 0-5% more training time (three
# alternated pairs); in a 30-step loop every step cut 200-250 MiB but cost 2-7%, as the pages handed back
# fault in again, and every 2 steps was no lower than every 4 (bench/train_memory.py --trim-steps).
HEAP_TRIM_STEPS = 4


def run_callback(run_id: str | None):
    """A Trainer callback: each log (loss, learning rate, grad norm) to the stage's MLflow run, a stop
    between steps when the run is interrupted (the staged checkpoints stay for a resume), and the heap
    trimmed every HEAP_TRIM_STEPS steps."""
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if run_id and state.is_world_process_zero and logs:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                tracking.log_metrics(run_id, numbers, step=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            check_stop()
            if state.global_step % HEAP_TRIM_STEPS == 0:
                trim_heap()

    return RunCallback()


def arguments_values(config: TrainingConfig, staging: Path, unpadded: bool = False) -> dict[str, Any]:
    """TrainingArguments' keyword values for a config (TRL's configs take the same ones). `unpadded`: the
    batches hold no pad tokens, so the Trainer counts every token it sees as trained."""
    s = config.schedule
    return {
        "output_dir": str(staging),
        "include_num_input_tokens_seen": "all" if unpadded else "non_padding",
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "learning_rate": config.learning_rate,
        "num_train_epochs": s.epochs or 1.0,
        "max_steps": s.max_steps or -1,
        "lr_scheduler_type": s.lr_scheduler_type,
        "lr_scheduler_kwargs": dict(s.lr_scheduler_kwargs or {}),
        # transformers 5 takes a ratio as a float warmup_steps in [0, 1) and reads 1.0 as one step: a whole-run
        # warm-up goes as the float just below 1 (ceil of steps * it is every step). Explicit steps win, as in
        # LlamaFactory.
        "warmup_steps": s.warmup_steps or (math.nextafter(1.0, 0.0) if s.warmup_ratio == 1 else s.warmup_ratio or 0),
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "optim": config.optim,
        "seed": config.seed,
        "bf16": config.precision == "bf16",
        "fp16": config.precision == "fp16",
        "use_cpu": not has_cuda(),
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "report_to": list(config.report_to) or "none",
        "activation_checkpointing": config.gradient_checkpointing,  # transformers 5 name for it
        "remove_unused_columns": False,
        "dataloader_num_workers": config.dataloader_num_workers,
        "save_only_model": config.save_only_model,
        "ddp_timeout": config.ddp_timeout,
        "disable_tqdm": False,
        "neftune_noise_alpha": config.neftune_noise_alpha,
        "use_liger_kernel": config.liger_kernel,
        # copies: transformers fills the configs' "auto" values in place, and the keyed config must not change
        "deepspeed": copy.deepcopy(config.launch.deepspeed),
        "fsdp": config.launch.fsdp,
        "fsdp_config": copy.deepcopy(config.launch.fsdp_config),
        "save_on_each_node": config.nnodes > 1,  # each node resumes from its own staging folder
        **low_rank_arguments(config.optimizer, config.optim),
    }


def trainer_hooks(config: TrainingConfig, arguments) -> dict[str, Any]:
    """Trainer keywords a config adds to any objective's Trainer: the use_* optimizer, when one is chosen."""
    return trainer_optimizer(config.optimizer, arguments, config.badam_verbose)


def resume_point(config: TrainingConfig, ctx: BuildContext) -> Path | None:
    """The checkpoint to resume from: the newest usable one of an earlier killed run of this key, else the
    recipe's resume_from_checkpoint (the key covers that checkpoint, so staged ones continue from it)."""
    explicit = ctx.locators["resume_from_checkpoint"]
    if explicit:
        problem = checkpoint_problem(Path(explicit), config.save_only_model)
        if problem:
            raise RecipeError(f"key 'resume_from_checkpoint': {explicit} cannot be resumed from: {problem}")
    staged = latest_usable_checkpoint(ctx.staging, config.save_only_model, ctx.log)
    return staged or (Path(explicit) if explicit else None)


def whole_run_loss(history: list[dict[str, Any]], resumed_step: int, this_run_loss: float, final_step: int) -> float:
    """Mean training loss over the whole run, also when it was resumed: the logged losses (each the mean
    since the previous log) cover the steps before the resume, the Trainer's figure the steps after it."""
    if not resumed_step:
        return this_run_loss
    before, previous = 0.0, 0
    for entry in history:
        if "loss" in entry and entry["step"] <= resumed_step:
            before += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    last = next((e["loss"] for e in reversed(history) if "loss" in e and e["step"] <= resumed_step), this_run_loss)
    before += last * (resumed_step - previous)  # steps after the last log before the checkpoint
    return (before + this_run_loss * (final_step - resumed_step)) / max(final_step, 1)


def run_trainer(trainer, config: TrainingConfig, ctx: BuildContext, out: Path) -> dict[str, Any]:
    """Train (resuming from a staged checkpoint when there is one), write log_history.json and
    train_results.json, report to MLflow; returns the results."""
    resume = resume_point(config, ctx)
    resumed_state = json.loads((resume / "trainer_state.json").read_text()) if resume else {}
    resumed_step = resumed_state.get("global_step", 0)
    tokens_before = resumed_state.get("num_input_tokens_seen", 0)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.monotonic() - started
    state = trainer.state
    write_history(state.log_history, out)
    tokens_this_run = state.num_input_tokens_seen - tokens_before
    summary = {
        "global_step": state.global_step,
        "resumed_from_step": resumed_step,
        "train_loss": whole_run_loss(state.log_history, resumed_step, result.training_loss, state.global_step),
        "train_seconds": round(seconds, 2),  # this process's share of the run
        "tokens_trained": int(state.num_input_tokens_seen),  # the whole run's non-padding tokens
        "tokens_per_second": round(tokens_this_run / max(seconds, 1e-9), 1),
        # ZeRO-3 leaves each rank a slice of every weight; ds_numel is the whole weight's size
        "trainable_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters()
                                    if p.requires_grad),
        "optimizer": optimizer_name(trainer.optimizer),
        "world_size": trainer.args.world_size,
        "distributed": str(trainer.accelerator.distributed_type.value),  # NO, MULTI_CPU, DEEPSPEED, FSDP, ...
    }
    ctx.log.info("trained %d steps (resumed at %d), %.1f tokens/s", state.global_step, resumed_step,
                 summary["tokens_per_second"])
    return summary


def optimizer_name(optimizer) -> str:
    """The class that really stepped: inside accelerate's and DeepSpeed's wrappers, and for layer-wise optimizers
    (one per parameter) the class of the first."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if getattr(optimizer, "optimizer_dict", None):
        optimizer = next(iter(optimizer.optimizer_dict.values()))
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def write_history(history: list[dict[str, Any]], out: Path) -> None:
    (out / "log_history.json").write_text(json.dumps(history, indent=1))


def write_results(summary: dict[str, Any], ctx: BuildContext, out: Path, history: list[dict[str, Any]],
                  plot: bool) -> None:
    """train_results.json, the figures on the stage's MLflow run, and the loss plot if asked for."""
    (out / "train_results.json").write_text(json.dumps(summary, indent=2))
    ctx.log_metrics({k: v for k, v in summary.items() if k != "resumed_from_step" and isinstance(v, (int, float))})
    if plot and ctx.run.mlflow_run_id:
        plot_loss(history, ctx.run.mlflow_run_id)


REPORTS = {"results": "train_results.json", "log_history": "log_history.json"}


def plot_loss(history: list[dict[str, Any]], run_id: str, key: str = "loss") -> None:
    """Attach a training curve to the MLflow run (LlamaFactory's plot_loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h[key]) for h in history if key in h]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([s for s, _ in points], [v for _, v in points])
    axis.set(xlabel="step", ylabel=key, title=f"training {key}")
    tracking.client().log_figure(run_id, figure, f"training_{key}.png")
    plt.close(figure)
