"""The recipe: LlamaFactory's flat YAML keys, validated into typed, frozen sections.

Every field says which stages read it (`stages=`). A stage's cache key covers exactly the fields
tagged with its name, so a field that cannot change a result (logging interval, run name) is
tagged with no stage and never invalidates anything.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.errors import RecipeError


def option(default: Any, description: str, *stages: str, **kwargs: Any) -> Any:
    """A recipe field with a description and the stages whose key it enters."""
    return Field(default, description=description, json_schema_extra={"stages": list(stages)}, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(Section):
    model_name_or_path: str | None = option(
        None, "Hub id, local HF directory, or .gguf file. Empty: the bundled SmolLM2-135M-Instruct.", "model"
    )
    model_revision: str = option("main", "Hub branch, tag or commit to load.", "model")
    gguf_file: str | None = option(None, "GGUF file name inside model_name_or_path, if it is a GGUF source.", "model")
    trust_remote_code: bool = option(False, "Allow model code shipped with a hub checkpoint.", "model")
    infer_dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto", "Dtype of the saved base checkpoint; auto picks what the hardware computes fastest.", "model"
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = option(
        "auto",
        "Attention implementation used when the model is loaded for training and evaluation.",
        "train",
        "evaluate",
    )
    quantization_bit: Literal[4, 8] | None = option(
        None, "Load the base model in 4- or 8-bit with bitsandbytes for training (QLoRA).", "train"
    )
    quantization_type: Literal["nf4", "fp4"] = option("nf4", "4-bit quantization data type.", "train")
    double_quantization: bool = option(True, "Quantize the 4-bit quantization constants too.", "train")


class DataSection(Section):
    dataset: str | None = option(None, "Registry dataset names, comma-separated.", "tokenize")
    dataset_dir: str = option("data", "Folder holding dataset_info.json and dataset files.")
    eval_dataset: str | None = option(None, "Registry dataset names to evaluate on, comma-separated.", "tokenize")
    template: str = option("default", "Chat template name.", "tokenize")
    cutoff_len: int = option(2048, "Maximum tokens per sample after tokenization.", "tokenize", gt=0)
    train_on_prompt: bool = option(False, "Compute the loss on prompt tokens too.", "tokenize")
    mask_history: bool = option(False, "Train only on the last assistant turn.", "tokenize")
    max_samples: int | None = option(None, "Keep at most this many rows of each dataset.", "tokenize", gt=0)
    val_size: float = option(0.0, "Held-out share (<1) or count (>=1) of the training rows.", "tokenize", ge=0)
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = option(
        "concat", "How several datasets are merged: concatenated, or interleaved until the first "
        "(under) or last (over) runs out.", "tokenize")
    interleave_probs: str | None = option(None, "Comma-separated sampling probabilities for interleaving.", "tokenize")
    streaming: bool = option(False, "Stream rows instead of materializing them; training then needs max_steps.",
                             "fetch", "tokenize")
    buffer_size: int = option(16384, "Shuffle buffer size in streaming mode.", "tokenize", gt=0)
    packing: bool | None = option(None, "Concatenate and chunk samples to cutoff_len (default: on for stage pt).",
                                  "tokenize")
    neat_packing: bool = option(False, "Pack SFT samples without attention or positions crossing samples.",
                                "tokenize")
    on_invalid_row: Literal["fail", "drop"] = option(
        "fail", "An invalid row stops the run with its location, or is dropped and counted.", "align")
    preprocessing_num_workers: int | None = option(None, "Processes used to tokenize.")
    overwrite_cache: bool = option(False, "Rebuild the data stages even if cached.")


class FinetuningSection(Section):
    stage: Literal["pt", "sft"] = option("sft", "Training stage: pt (pretraining) or sft.", "tokenize", "train")
    do_train: bool = option(True, "Train; false evaluates the base model only.")
    finetuning_type: Literal["lora", "full", "freeze"] = option("lora", "Which weights are trained.", "train")
    lora_rank: int = option(8, "LoRA rank.", "train", gt=0)
    lora_alpha: int | None = option(None, "LoRA scaling numerator; default twice the rank.", "train")
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.", "train", ge=0, lt=1)
    lora_target: str = option("all", "Comma-separated module names, or 'all' linear layers.", "train")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA).", "train")
    use_rslora: bool = option(False, "Rank-stabilised LoRA scaling.", "train")
    freeze_trainable_layers: int = option(2, "Freeze tuning: train this many last (or, if <0, first) layers.", "train")


class TrainingSection(Section):
    per_device_train_batch_size: int = option(1, "Rows per device per step (tokenize reports padding at it).",
                                              "tokenize", "train", gt=0)
    gradient_accumulation_steps: int = option(1, "Steps accumulated per optimizer update.", "train", gt=0)
    learning_rate: float = option(5e-5, "Peak learning rate.", "train", gt=0)
    num_train_epochs: float = option(3.0, "Epochs (ignored when max_steps > 0).", "train", gt=0)
    max_steps: int = option(-1, "Optimizer steps; -1 trains num_train_epochs.", "train")
    lr_scheduler_type: str = option("cosine", "transformers scheduler name.", "train")
    warmup_ratio: float = option(0.0, "Share of steps spent warming up.", "train", ge=0, le=1)
    warmup_steps: int = option(0, "Warm-up steps (wins over warmup_ratio).", "train", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", "train", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", "train", gt=0)
    optim: str = option("adamw_torch", "transformers optimizer name.", "train")
    bf16: bool = option(False, "Train in bfloat16 where the hardware supports it.", "train")
    fp16: bool = option(False, "Train in float16 mixed precision where the hardware supports it.", "train")
    seed: int = option(42, "Seed for shuffling, splitting and initialisation.", "tokenize", "train")
    disable_gradient_checkpointing: bool = option(False, "Keep activations instead of recomputing them.")
    logging_steps: int = option(10, "Log training loss every this many steps.", gt=0)
    save_steps: int = option(500, "Save a resumable checkpoint every this many steps.", gt=0)
    save_total_limit: int | None = option(None, "Keep at most this many checkpoints while training.")
    plot_loss: bool = option(False, "Save a loss curve image with the adapter.")
    report_to: str | list[str] = option("none", "Extra transformers loggers (MLflow tracking is always on).")
    output_dir: str | None = option(None, "Also copy the final adapter or weights here.")
    overwrite_output_dir: bool = option(False, "Allow output_dir to hold files already.")
    run_name: str | None = option(None, "Name of the MLflow parent run.")
    dataloader_num_workers: int = option(0, "Processes feeding batches to the trainer.", ge=0)
    save_only_model: bool = option(False, "Checkpoints without optimizer state (smaller, but resume restarts it).")
    ddp_timeout: int = option(1800, "Seconds before a multi-process collective times out.", gt=0)
    resume_from_checkpoint: str | None = option(None, "Resume from this checkpoint instead of the newest staged one.")


class EvaluationSection(Section):
    do_eval: bool = option(True, "Evaluate base and tuned models on the held-out data.")
    do_predict: bool = option(True, "Generate predictions for ROUGE/BLEU (perplexity is always computed).", "evaluate")
    predict_with_generate: bool = option(True, "LlamaFactory's switch for generation-based metrics.", "evaluate")
    per_device_eval_batch_size: int = option(8, "Rows per generation/perplexity batch.", "evaluate", gt=0)
    max_new_tokens: int = option(512, "Generation length limit.", "evaluate", gt=0)
    do_sample: bool = option(True, "Sample instead of greedy decoding.", "evaluate")
    temperature: float = option(0.95, "Sampling temperature.", "evaluate", gt=0)
    top_p: float = option(0.7, "Nucleus sampling mass.", "evaluate", gt=0, le=1)
    top_k: int = option(50, "Top-k sampling.", "evaluate", ge=0)
    repetition_penalty: float = option(1.0, "Penalty on repeated tokens.", "evaluate", gt=0)


class ExportSection(Section):
    export_dir: str | None = option(None, "Also copy the merged model here.")
    export_size: int = option(5, "Shard size of the merged model, in GB.", "merge", gt=0)
    export_legacy_format: bool = option(False, "Save .bin instead of .safetensors.", "merge")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "finetuning": FinetuningSection,
    "training": TrainingSection,
    "evaluation": EvaluationSection,
    "export": ExportSection,
}


class Recipe(Section):
    """A whole fine-tune, validated and immutable. Build it with `Recipe.from_flat` or `load_recipe`."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    finetuning: FinetuningSection = FinetuningSection()
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    export: ExportSection = ExportSection()

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "recipe") -> Recipe:
        """Validate LlamaFactory-style flat keys; errors name the key and the source."""
        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            section = FIELD_SECTION.get(key)
            if section is None:
                raise RecipeError(f"{source}: unknown key '{key}'{_suggestion(key)}")
            grouped[section][key] = value
        try:
            recipe = cls(**grouped)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = next(
                (str(p) for p in reversed(err["loc"]) if str(p) in FIELD_SECTION), ".".join(map(str, err["loc"]))
            )
            raise RecipeError(f"{source}: key '{key}': {err['msg']} (got {err.get('input')!r})") from None
        check_combinations(recipe, source)
        return recipe

    def flat(self) -> dict[str, Any]:
        """All fields as LlamaFactory's flat keys."""
        return {k: v for name in SECTIONS for k, v in getattr(self, name).model_dump().items()}

    def slice_for(self, stage: str) -> dict[str, Any]:
        """The fields tagged with `stage`: exactly what enters that stage's cache key."""
        flat = self.flat()
        return {k: flat[k] for k in STAGE_FIELDS.get(stage, ())}

    def replace(self, **changes: Any) -> Recipe:
        """A new validated recipe with some flat keys changed."""
        return Recipe.from_flat({**self.flat(), **changes}, source="override")


FIELD_SECTION = {f: name for name, sec in SECTIONS.items() for f in sec.model_fields}
STAGE_FIELDS: dict[str, list[str]] = {}
for _section in SECTIONS.values():
    for _name, _field in _section.model_fields.items():
        for _stage in (_field.json_schema_extra or {}).get("stages", []):
            STAGE_FIELDS.setdefault(_stage, []).append(_name)


def _suggestion(key: str) -> str:
    match = difflib.get_close_matches(key, FIELD_SECTION, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def check_combinations(recipe: Recipe, source: str) -> None:
    """Reject option combinations that cannot work, before anything runs."""
    if recipe.training.bf16 and recipe.training.fp16:
        raise RecipeError(f"{source}: keys 'bf16' and 'fp16' are both true; choose one")
    if recipe.model.quantization_bit and recipe.finetuning.finetuning_type != "lora":
        raise RecipeError(f"{source}: key 'quantization_bit' needs finetuning_type: lora (QLoRA)")
    if recipe.data.streaming and recipe.training.max_steps <= 0:
        raise RecipeError(f"{source}: key 'streaming' needs 'max_steps' > 0 (a stream has no known length)")
    if recipe.data.streaming and (recipe.data.packing or recipe.data.neat_packing):
        raise RecipeError(f"{source}: keys 'streaming' and 'packing'/'neat_packing' cannot be combined")
    if recipe.data.streaming and 0 < recipe.data.val_size < 1:
        raise RecipeError(f"{source}: key 'val_size' must be a row count (>= 1) with streaming")
    if recipe.finetuning.do_train and not recipe.data.dataset:
        raise RecipeError(f"{source}: key 'dataset' is required when do_train is true")


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set key=value`; the value is read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected key=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    values = {**values, **dict(parse_override(item) for item in overrides)}
    return Recipe.from_flat(values, source=str(path))
