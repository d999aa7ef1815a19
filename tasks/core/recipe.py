"""The recipe: LlamaFactory's flat YAML keys, validated into typed, frozen sections.

Which fields a stage reads, and when they apply, is decided by that stage's planner (its typed
config); this module only validates values and the combinations that can be judged from the recipe
alone. Registry- and model-dependent checks run at plan time (flows/plan.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.core.errors import RecipeError, did_you_mean, read_utf8


def option(default: Any, description: str, **kwargs: Any) -> Any:
    """A recipe field with the description the Prefect form and `--help` show."""
    return Field(default, description=description, **kwargs)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSection(Section):
    model_name_or_path: str | None = option(
        None, "Hub id, local HF directory, or .gguf file. Empty: the bundled SmolLM2-135M-Instruct."
    )
    model_revision: str = option("main", "Hub branch, tag or commit to load.")
    gguf_file: str | None = option(None, "GGUF file name inside model_name_or_path, if it is a GGUF source.")
    infer_backend: Literal["huggingface", "vllm"] = option(
        "huggingface", "Engine for `tunefactory chat` and `tunefactory api`.")
    adapter_name_or_path: str | None = option(
        None, "A trained adapter to start from: a folder, an artifact id (train/<key>) or the recipe that trains it.")
    trust_remote_code: bool = option(False, "Allow model code shipped with a hub checkpoint.")
    infer_dtype: Literal["auto", "float32", "float16", "bfloat16"] = option(
        "auto", "Dtype of the saved base checkpoint; auto picks what the hardware computes fastest."
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = option(
        "auto",
        "Attention implementation used when the model is loaded for training and evaluation.",
    )
    quantization_bit: Literal[4, 8] | None = option(
        None, "Load the base model in 4- or 8-bit with bitsandbytes for training (QLoRA)."
    )
    quantization_type: Literal["nf4", "fp4"] = option("nf4", "4-bit quantization data type.")
    quantization_method: Literal["bnb", "hqq", "eetq"] = option(
        "bnb", "On-the-fly quantization backend for quantization_bit; bnb (bitsandbytes) only.")
    double_quantization: bool = option(True, "Quantize the 4-bit quantization constants too.")
    rope_scaling: Literal["linear", "dynamic", "yarn", "llama3"] | None = option(
        None, "Stretch RoPE when cutoff_len exceeds the model's context: factor ceil(cutoff_len / context).")
    upcast_layernorm: bool = option(False, "Train with the layernorm weights in float32.")
    upcast_lmhead_output: bool = option(False, "Compute the lm_head output in float32 while training.")
    low_cpu_mem_usage: bool = option(
        True, "Accepted for LlamaFactory recipes: transformers 5 always loads memory-efficiently.")
    train_from_scratch: bool = option(False, "Start from random weights (the model's config, seeded) instead.")
    resize_vocab: bool = option(
        False, "Grow the embeddings to the tokenizer, adding the template's missing stop tokens as special tokens.")
    split_special_tokens: bool = option(False, "Tokenize special tokens' text as ordinary text, not as one token.")
    add_tokens: str | None = option(None, "Non-special tokens to add to the vocabulary, comma-separated.")
    add_special_tokens: str | None = option(None, "Special tokens to add to the vocabulary, comma-separated.")
    new_special_tokens_config: str | None = option(
        None, "YAML file mapping new special tokens to description texts (replaces add_special_tokens).")
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = option(
        "noise_init", "New token rows start at the mean of the old rows plus noise, or (desc_init) at the mean of "
        "their description's tokens.")
    enable_liger_kernel: bool = option(
        False, "Liger's fused Triton kernels for training (needs a CUDA GPU and liger-kernel).")
    use_unsloth: bool = option(False, "Unsloth's patched training (needs a CUDA GPU and the unsloth package).")
    shift_attn: bool = option(False, "LongLoRA's shifted short attention, S^2-Attn (not built in).")


class DataSection(Section):
    dataset: str | None = option(None, "Registry dataset names, comma-separated.")
    dataset_dir: str = option("data", "Folder holding dataset_info.json and dataset files.")
    allow_outside_dataset_dir: bool = option(
        False, "Let dataset_info.json point at files outside dataset_dir (off: paths are confined to it).")
    eval_dataset: str | None = option(None, "Registry dataset names to evaluate on, comma-separated.")
    template: str | None = option(
        None, "Chat template name; unset: the tokenizer's own chat template (auto) if it has one, else empty.")
    default_system: str | None = option(None, "Replace the template's default system prompt.")
    tool_format: Literal["default", "qwen", "llama3", "mistral", "glm4"] | None = option(
        None, "Write tool definitions and tool calls in this format instead of the template's own.")
    enable_thinking: bool = option(
        True, "Reasoning templates: train on the <think> block (false: drop thoughts, an empty block in the prompt).")
    preserve_thinking: bool = option(False, "Reasoning templates: keep the thinking blocks of replies in history.")
    cutoff_len: int = option(2048, "Maximum tokens per sample after tokenization.", gt=0)
    train_on_prompt: bool = option(False, "Compute the loss on prompt tokens too.")
    mask_history: bool = option(False, "Train only on the last assistant turn.")
    max_samples: int | None = option(None, "Keep at most this many rows of each dataset.", gt=0)
    val_size: float = option(0.0, "Held-out share (<1) or count (>=1) of the training rows.", ge=0)
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = option(
        "concat", "How several datasets are merged: concatenated, or interleaved until the first "
        "(under) or last (over) runs out.")
    interleave_probs: str | None = option(None, "Comma-separated sampling probabilities for interleaving.")
    streaming: bool = option(False, "Stream rows instead of materializing them; training then needs max_steps.")
    buffer_size: int = option(16384, "Shuffle buffer size in streaming mode.", gt=0)
    packing: bool | None = option(None, "Concatenate and chunk samples to cutoff_len (default: on for stage pt).")
    neat_packing: bool = option(False, "Pack SFT samples without attention or positions crossing samples.")
    on_invalid_row: Literal["fail", "drop"] = option(
        "fail", "An invalid row stops the run with its location, or is dropped and counted.")
    preprocessing_num_workers: int | None = option(None, "Processes used to tokenize.")
    overwrite_cache: bool = option(False, "Rebuild the data stages even if cached.")


class FinetuningSection(Section):
    stage: Literal["pt", "sft", "rm", "dpo", "kto", "ppo"] = option(
        "sft", "Training objective: pt (pretraining), sft, rm (reward model), dpo (also ipo, orpo, simpo, hinge), "
        "kto or ppo.")
    do_train: bool = option(True, "Train; false evaluates the base model only.")
    finetuning_type: Literal["lora", "full", "freeze"] = option("lora", "Which weights are trained.")
    lora_rank: int = option(8, "LoRA rank.", gt=0)
    lora_alpha: int | None = option(None, "LoRA scaling numerator; default twice the rank.", gt=0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.", ge=0, lt=1)
    lora_target: str = option("all", "Comma-separated module names, or 'all' linear layers.")
    use_dora: bool = option(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = option(False, "Rank-stabilised LoRA scaling.")
    freeze_trainable_layers: int = option(2, "Freeze tuning: train this many last (or, if <0, first) layers.")
    freeze_trainable_modules: str = option(
        "all", "Freeze tuning: comma-separated modules inside the trainable layers (mlp, self_attn), or 'all'.")
    freeze_extra_modules: str | None = option(
        None, "Freeze tuning: comma-separated modules outside the decoder layers to train too (embed_tokens, norm).")
    additional_target: str | None = option(
        None, "LoRA: comma-separated modules trained in full and saved with the adapter (embed_tokens, lm_head).")
    module_dropout: float = option(0.0, "OFT's module dropout (LlamaFactory's OFT key); LoRA has none.", ge=0, lt=1)
    loraplus_lr_ratio: float | None = option(None, "LoRA+: the B matrices learn this many times faster.", gt=0)
    loraplus_lr_embedding: float = option(1e-6, "LoRA+: learning rate of an embedding's LoRA B matrix.", gt=0)
    pissa_init: bool = option(False, "LoRA: initialise the adapter from the base's principal singular vectors (PiSSA).")
    pissa_iter: int = option(16, "PiSSA: fast-SVD iterations; -1 uses the exact SVD.", ge=-1)
    pissa_convert: bool = option(
        False, "PiSSA: save the adapter converted to a plain LoRA on the original base (required here).")
    create_new_adapter: bool = option(
        False, "With adapter_name_or_path: merge that adapter into the base and train a new one.")
    pure_bf16: bool = option(False, "Train in bfloat16 weights without mixed precision (no fp32 master copy).")
    use_galore: bool = option(False, "GaLore: gradient low-rank projection (full or freeze tuning).")
    galore_target: str = option("all", "GaLore: comma-separated linear module names, or 'all'.")
    galore_rank: int = option(16, "GaLore: projection rank.", gt=0)
    galore_update_interval: int = option(200, "GaLore: steps between projection updates.", gt=0)
    galore_scale: float = option(2.0, "GaLore: scale of the projected update.", gt=0)
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = option("std", "GaLore: projection type.")
    galore_layerwise: bool = option(False, "GaLore: step each parameter as its gradient arrives (saves memory).")
    use_apollo: bool = option(False, "APOLLO: approximated gradient scaling (full or freeze tuning).")
    apollo_target: str = option("all", "APOLLO: comma-separated linear module names, or 'all'.")
    apollo_rank: int = option(16, "APOLLO: projection rank.", gt=0)
    apollo_update_interval: int = option(200, "APOLLO: steps between projection updates.", gt=0)
    apollo_scale: float = option(32.0, "APOLLO: scale of the update.", gt=0)
    apollo_proj: Literal["svd", "random"] = option("random", "APOLLO: projection.")
    apollo_proj_type: Literal["std", "right", "left"] = option("std", "APOLLO: projection type.")
    apollo_scale_type: Literal["channel", "tensor"] = option("channel", "APOLLO: scaling per channel or tensor.")
    apollo_layerwise: bool = option(False, "APOLLO: step each parameter as its gradient arrives.")
    apollo_scale_front: bool = option(False, "APOLLO: scale the gradient before the norm-growth limiter.")
    use_badam: bool = option(False, "BAdam: block coordinate descent with Adam (full tuning).")
    badam_mode: Literal["layer", "ratio"] = option("layer", "BAdam: update one layer block at a time, or a ratio of "
                                                   "each parameter (ratio: one process, no DeepSpeed or FSDP).")
    badam_start_block: int | None = option(None, "BAdam layer mode: the block to start with.", ge=0)
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = option(
        "ascending", "BAdam layer mode: the order blocks take turns in.")
    badam_switch_interval: int = option(50, "BAdam layer mode: steps before switching block.", gt=0)
    badam_update_ratio: float = option(0.05, "BAdam ratio mode: share of each parameter updated.", gt=0, le=1)
    badam_mask_mode: Literal["adjacent", "scatter"] = option("adjacent", "BAdam ratio mode: which entries are updated.")
    badam_verbose: int = option(0, "BAdam: 0 quiet, 1 block switches, 2 trainable parameters.", ge=0, le=2)
    use_adam_mini: bool = option(False, "Adam-mini: one learning rate per parameter block (less optimizer memory).")
    use_muon: bool = option(False, "Muon for 2-D hidden weights, AdamW for the rest.")


class RLHFSection(Section):
    """LlamaFactory's RLHFArguments: preference (dpo, kto), reward-model and PPO options."""

    pref_beta: float = option(0.1, "The beta parameter in the preference loss.", gt=0)
    pref_ftx: float = option(0.0, "The supervised fine-tuning loss coefficient in DPO/KTO training.", ge=0)
    pref_loss: Literal["sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo"] = option(
        "sigmoid", "The DPO loss: sigmoid (DPO), hinge (SLiC), ipo, kto_pair, orpo or simpo.")
    dpo_label_smoothing: float = option(0.0, "Robust DPO (cDPO) label smoothing, between 0 and 0.5.", ge=0, le=0.5)
    kto_chosen_weight: float = option(1.0, "Weight of the desirable losses in KTO training.", gt=0)
    kto_rejected_weight: float = option(1.0, "Weight of the undesirable losses in KTO training.", gt=0)
    simpo_gamma: float = option(0.5, "The target reward margin term in SimPO loss.", ge=0)
    ld_alpha: float | None = option(None, "LD-DPO: weight of the log-probs of tokens past the shorter response.",
                                    ge=0, le=1)
    ppo_buffer_size: int = option(1, "Mini-batches gathered into one PPO optimization step.", gt=0)
    ppo_epochs: int = option(4, "Epochs over each PPO step's experience.", gt=0)
    ppo_score_norm: bool = option(False, "Normalise reward scores with their running mean and std.")
    ppo_target: float = option(6.0, "Target KL for adaptive KL control in PPO.", gt=0)
    ppo_whiten_rewards: bool = option(False, "Whiten the rewards before computing advantages in PPO.")
    ref_model: str | None = option(None, "Reference model for DPO/KTO (default: the base with adapters disabled).")
    ref_model_adapters: str | None = option(None, "Adapter applied to ref_model (a folder or artifact id).")
    ref_model_quantization_bit: Literal[4, 8] | None = option(None, "Load the reference model in 4 or 8 bit.")
    reward_model: str | None = option(
        None, "PPO's reward model: an rm recipe file, an artifact id (reward/<key>) or a folder holding one.")
    reward_model_adapters: str | None = option(None, "Not supported: give the rm recipe or its folder as reward_model.")
    reward_model_quantization_bit: Literal[4, 8] | None = option(None, "Load a full reward model in 4 or 8 bit.")
    reward_model_type: Literal["lora", "full", "api"] = option(
        "lora", "lora: the reward adapter and head share the policy's base model; full: a separate model.")


class TrainingSection(Section):
    per_device_train_batch_size: int = option(1, "Rows per device per optimizer micro-step.", gt=0)
    gradient_accumulation_steps: int = option(1, "Steps accumulated per optimizer update.", gt=0)
    learning_rate: float = option(5e-5, "Peak learning rate.", gt=0)
    num_train_epochs: float = option(3.0, "Epochs (ignored when max_steps > 0).", gt=0)
    max_steps: int = option(-1, "Optimizer steps; -1 trains num_train_epochs.")
    lr_scheduler_type: str = option("cosine", "transformers scheduler name.")
    lr_scheduler_kwargs: dict[str, Any] | None = option(
        None, "The scheduler's own arguments, a mapping or JSON (cosine_with_min_lr: min_lr or min_lr_rate; "
        "warmup_stable_decay: num_decay_steps).")

    @field_validator("lr_scheduler_kwargs", mode="before")
    @classmethod
    def mapping_from_json(cls, value: Any) -> Any:
        """LlamaFactory's CLI passes it as JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else None
            except ValueError:
                raise ValueError("not a mapping or JSON text of one") from None
        return value
    warmup_ratio: float = option(0.0, "Share of steps spent warming up.", ge=0, le=1)
    warmup_steps: int = option(0, "Warm-up steps (wins over warmup_ratio).", ge=0)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = option(1.0, "Gradient clipping norm.", gt=0)
    optim: str = option("adamw_torch", "transformers optimizer name.")
    bf16: bool = option(False, "Train in bfloat16 where the hardware supports it.")
    fp16: bool = option(False, "Train in float16 mixed precision where the hardware supports it.")
    seed: int = option(42, "Seed for shuffling, splitting and initialisation.", ge=0, lt=2**32)
    disable_gradient_checkpointing: bool = option(False, "Keep activations instead of recomputing them.")
    logging_steps: int = option(10, "Log training loss every this many steps.", gt=0)
    save_steps: int = option(500, "Save a resumable checkpoint every this many steps.", gt=0)
    save_total_limit: int | None = option(None, "Keep at most this many checkpoints while training.", gt=0)
    plot_loss: bool = option(False, "Save a loss curve image with the adapter.")
    report_to: str | list[str] = option("none", "Extra transformers loggers (MLflow tracking is always on).")
    output_dir: str | None = option(None, "Also copy the final adapter or weights here.")
    overwrite_output_dir: bool = option(False, "Allow output_dir to hold files already.")
    run_name: str | None = option(None, "Name of the MLflow parent run.")
    dataloader_num_workers: int = option(0, "Processes feeding batches to the trainer.", ge=0)
    save_only_model: bool = option(False, "Checkpoints without optimizer state (smaller, but resume restarts it).")
    ddp_timeout: int = option(1800, "Seconds before a multi-process collective times out.", gt=0)
    resume_from_checkpoint: str | None = option(
        None, "Resume from this checkpoint (a re-run of a killed run resumes from its own newer staged one).")
    neftune_noise_alpha: float | None = option(None, "NEFTune: noise added to the input embeddings while training.",
                                               gt=0)
    deepspeed: str | None = option(None, "DeepSpeed config file (configs/deepspeed/ds_z{0,2,3}[_offload]_config.json).")
    fsdp: str | None = option(None, "PyTorch FSDP options as transformers takes them ('full_shard auto_wrap').")
    fsdp_config: str | None = option(None, "FSDP config file (JSON), as transformers takes it.")
    nproc_per_node: int | None = option(None, "Training processes on this machine (default: every visible GPU; 1 "
                                              "on CPU).", gt=0)
    nnodes: int = option(1, "Machines training together (one Prefect worker runs the recipe on each).", gt=0)
    node_rank: int = option(0, "This machine's rank among nnodes (0 gathers the artifact).", ge=0)
    master_addr: str = option("127.0.0.1", "Address of the node_rank 0 machine.")
    master_port: int | None = option(None, "Port for the ranks' rendezvous (default: a free port, one node only).",
                                     gt=0, lt=65536)


class EvaluationSection(Section):
    do_eval: bool = option(True, "Evaluate base and tuned models on the held-out data.")
    do_predict: bool = option(True, "Generate predictions for ROUGE/BLEU (perplexity is always computed).")
    predict_with_generate: bool = option(True, "LlamaFactory's switch for generation-based metrics.")
    per_device_eval_batch_size: int = option(8, "Rows per generation/perplexity batch.", gt=0)
    max_new_tokens: int = option(512, "Generation length limit.", gt=0)
    do_sample: bool = option(True, "Sample instead of greedy decoding.")
    temperature: float = option(0.95, "Sampling temperature.", gt=0)
    top_p: float = option(0.7, "Nucleus sampling mass.", gt=0, le=1)
    top_k: int = option(50, "Top-k sampling.", ge=0)
    repetition_penalty: float = option(1.0, "Penalty on repeated tokens.", gt=0)
    task: str | None = option(None, "A multiple-choice exam to score base and tuned models on: <exam>_<split> "
                                    "(mmlu_test, cmmlu_test, ceval_validation, the bundled pystdlib_test).")
    task_dir: str = option("evaluation", "Folder (or hub organisation) holding the exams; the bundled ones are "
                                         "always found.")
    lang: Literal["en", "zh"] = option("en", "Language of the exam prompt's header and answer cue.")
    n_shot: int = option(5, "Solved dev-split examples shown before each exam question.", ge=0)
    batch_size: int = option(4, "Exam questions per forward pass.", gt=0)
    save_dir: str | None = option(None, "Also write the exam reports (results.json, report.md) here.")


class ExportSection(Section):
    export_dir: str | None = option(None, "Also copy the merged model here.")
    export_size: int = option(5, "Shard size of the merged model, in GB.", gt=0)
    export_legacy_format: bool = option(False, "Save .bin instead of .safetensors.")
    export_device: Literal["cpu", "auto"] = option("cpu", "Where the model is loaded to be merged and saved.")


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "data": DataSection,
    "finetuning": FinetuningSection,
    "rlhf": RLHFSection,
    "training": TrainingSection,
    "evaluation": EvaluationSection,
    "export": ExportSection,
}


class Recipe(Section):
    """A whole fine-tune, validated and immutable. Build it with `Recipe.from_flat` or `load_recipe`."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    finetuning: FinetuningSection = FinetuningSection()
    rlhf: RLHFSection = RLHFSection()
    training: TrainingSection = TrainingSection()
    evaluation: EvaluationSection = EvaluationSection()
    export: ExportSection = ExportSection()

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "recipe",
                  given_by: dict[str, str] | None = None) -> Recipe:
        """Validate LlamaFactory-style flat keys; errors name the key and where it was given: `given_by`'s
        entry for it (a `--set`), else the source."""
        def where(key: str) -> str:
            return (given_by or {}).get(key, source)

        grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key in values:
            if key in MULTIMODAL_KEYS:
                raise RecipeError(f"{where(key)}: key '{key}': image/video/audio inputs are not supported yet")
            if key in UNSUPPORTED_KEYS:  # named, so a near match is not suggested and then silently ignored
                raise RecipeError(f"{where(key)}: key '{key}': {UNSUPPORTED_KEYS[key]}")
        for key, value in values.items():
            section = FIELD_SECTION.get(key)
            if section is None:
                raise RecipeError(f"{where(key)}: unknown key '{key}'{did_you_mean(key, FIELD_SECTION)}")
            grouped[section][key] = value
        try:
            recipe = cls(**grouped)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = next(
                (str(p) for p in reversed(err["loc"]) if str(p) in FIELD_SECTION), ".".join(map(str, err["loc"]))
            )
            raise RecipeError(f"{where(key)}: key '{key}': {err['msg']} (got {err.get('input')!r})") from None
        try:
            check_combinations(recipe, source)
        except RecipeError as error:
            raise RecipeError(blamed(str(error), source, given_by or {})) from None
        return recipe

    def flat(self) -> dict[str, Any]:
        """All fields as LlamaFactory's flat keys."""
        return {k: v for name in SECTIONS for k, v in getattr(self, name).model_dump().items()}

    def replace(self, **changes: Any) -> Recipe:
        """A new validated recipe with some flat keys changed."""
        return self.checked("override", changes)

    def checked(self, source: str, changes: dict[str, Any] | None = None, changes_source: str = "override"
                ) -> Recipe:
        """This recipe (with changes) through every check `from_flat` makes: a recipe built as a model (a flow's
        parameters, the Prefect UI's form) has only been validated field by field. A mistake in a change is
        reported as `changes_source`'s."""
        changes = changes or {}
        return Recipe.from_flat({**self.flat(), **changes}, source=source,
                                given_by=dict.fromkeys(changes, changes_source))


FIELD_SECTION = {f: name for name, sec in SECTIONS.items() for f in sec.model_fields}


def blamed(message: str, source: str, given_by: dict[str, str]) -> str:
    """A check's message ("<source>: key 'x' ...") said where the first key it names that a change gave (a
    `--set`, an override) was given, rather than the recipe file."""
    if not message.startswith(f"{source}: "):
        return message
    named = re.findall(r"'([a-z0-9_]+)'", message)
    giver = next((given_by[key] for key in named if key in given_by), None)
    return f"{giver}: {message.removeprefix(f'{source}: ')}" if giver else message
# LlamaFactory's keys for image, video and audio inputs: a recipe using them is refused by name.
MULTIMODAL_KEYS = {"image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches",
                   "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video",
                   "audio_sampling_rate", "media_dir", "freeze_vision_tower", "freeze_multi_modal_projector",
                   "freeze_language_model", "train_mm_proj_only"}

# LlamaFactory keys whose feature TuneFactory lacks; without this, `export_quantization_bit` got "did you mean
# 'quantization_bit'?", which export ignores, and the user got an unquantized export without a word.
UNSUPPORTED_KEYS = {
    **dict.fromkeys(("export_quantization_bit", "export_quantization_dataset", "export_quantization_nsamples",
                     "export_quantization_maxlen"),
                    "quantizing an export (GPTQ) is not supported; export in infer_dtype, or train QLoRA with "
                    "quantization_bit"),
    "export_hub_model_id": "pushing an export to the hub is not supported; export to export_dir and upload it "
                           "with `hf upload`",
}


def check_combinations(recipe: Recipe, source: str) -> None:
    """Reject values and option combinations that cannot work, before anything runs."""
    data, training = recipe.data, recipe.training
    if training.bf16 and training.fp16:
        raise RecipeError(f"{source}: keys 'bf16' and 'fp16' are both true; choose one")
    if recipe.model.quantization_method != "bnb":
        raise RecipeError(f"{source}: key 'quantization_method': {recipe.model.quantization_method} is not supported; "
                          "quantization_bit quantizes with bitsandbytes (bnb)")
    if recipe.model.quantization_bit and recipe.finetuning.finetuning_type != "lora":
        raise RecipeError(f"{source}: key 'quantization_bit' needs finetuning_type: lora (QLoRA)")
    if data.streaming and training.max_steps <= 0:
        raise RecipeError(f"{source}: key 'streaming' needs 'max_steps' > 0 (a stream has no known length)")
    if data.streaming and (data.neat_packing or (data.packing and recipe.finetuning.stage != "pt")):
        raise RecipeError(f"{source}: keys 'streaming' and 'packing'/'neat_packing' cannot be combined (a stream "
                          "of stage pt is packed into cutoff_len blocks unless packing: false)")
    if data.val_size and data.eval_dataset:  # as LlamaFactory: one or the other says what is evaluated
        raise RecipeError(f"{source}: keys 'val_size' and 'eval_dataset' both choose the evaluation rows; keep one")
    if data.val_size and not data.dataset:
        raise RecipeError(f"{source}: key 'val_size' holds out rows of 'dataset', which is not set")
    if data.streaming and 0 < data.val_size < 1:
        raise RecipeError(f"{source}: key 'val_size' must be a row count (>= 1) with streaming")
    if recipe.model.init_special_tokens != "noise_init" and not recipe.model.new_special_tokens_config:
        raise RecipeError(f"{source}: key 'init_special_tokens': {recipe.model.init_special_tokens} needs "
                          "'new_special_tokens_config' (the token descriptions)")
    if data.mask_history and data.train_on_prompt:
        raise RecipeError(f"{source}: keys 'mask_history' and 'train_on_prompt' cannot both be true")
    from tasks.templates.registry import TEMPLATES  # the template declarations, not loaded for every recipe key

    if data.train_on_prompt and data.template in TEMPLATES and TEMPLATES[data.template].efficient_eos:
        raise RecipeError(f"{source}: key 'train_on_prompt': template {data.template} learns to stop from an EOS "
                          "label where each prompt starts (efficient_eos), which training on prompts would replace "
                          "(LlamaFactory refuses it too)")
    if training.max_steps == 0 or training.max_steps < -1:
        raise RecipeError(f"{source}: key 'max_steps' must be a positive step count, or -1 to train "
                          f"num_train_epochs (got {training.max_steps})")
    check_interleave_probs(recipe, source)
    check_trainer_names(recipe, source)
    check_rlhf(recipe, source)
    check_methods(recipe, source)
    check_launch(recipe, source)


OPTIMIZER_KEYS = ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon", "loraplus_lr_ratio")


def check_methods(recipe: Recipe, source: str) -> None:
    """Finetuning methods and optimizers that exclude each other (LlamaFactory's rules, plus the artifact's)."""
    f, t, m = recipe.finetuning, recipe.training, recipe.model
    chosen = [key for key in OPTIMIZER_KEYS if getattr(f, key) not in (None, False)]
    if len(chosen) > 1:
        raise RecipeError(f"{source}: keys {' and '.join(map(repr, chosen))} each choose the optimizer; keep one")
    if f.stage == "ppo":
        for key in chosen + ["neftune_noise_alpha"] * bool(t.neftune_noise_alpha):
            raise RecipeError(f"{source}: key '{key}' does not apply to stage ppo (its own loop trains with the "
                              "optimizer `optim` names)")
        if t.save_only_model:
            raise RecipeError(f"{source}: key 'save_only_model' does not apply to stage ppo (its checkpoints hold the "
                              "whole loop's state, to resume from)")
    # Switches that choose a method of one finetuning_type (its sizes, such as lora_rank, are harmless leftovers).
    only_for = {"lora": ("use_dora", "use_rslora", "loraplus_lr_ratio", "pissa_init", "additional_target",
                         "create_new_adapter"), "freeze": ("freeze_extra_modules",)}
    for kind, keys in only_for.items():
        for key in keys:
            if f.finetuning_type != kind and getattr(f, key) not in (None, False):
                raise RecipeError(f"{source}: key '{key}' applies to finetuning_type: {kind} (got {f.finetuning_type})")
    for key in ("use_galore", "use_apollo", "use_badam"):
        if getattr(f, key) and f.finetuning_type == "lora":
            raise RecipeError(f"{source}: key '{key}' trains full weights; use finetuning_type: full or freeze, "
                              "not lora")
    if f.use_badam and f.finetuning_type != "full":
        raise RecipeError(f"{source}: key 'use_badam' chooses its own blocks; use finetuning_type: full")
    if f.module_dropout:
        raise RecipeError(f"{source}: key 'module_dropout' is OFT's (LoRA has no module dropout); use lora_dropout")
    if f.pissa_init:
        if m.quantization_bit:
            raise RecipeError(f"{source}: keys 'pissa_init' and 'quantization_bit' cannot be combined (PiSSA "
                              "factorises full-precision weights)")
        if f.stage in ("ppo", "kto") or (f.stage == "dpo" and recipe.rlhf.pref_loss not in ("orpo", "simpo")):
            raise RecipeError(f"{source}: key 'pissa_init' does not fit stage {f.stage} (its reference model is the "
                              "base with the adapter off)")
        if not f.pissa_convert:
            raise RecipeError(f"{source}: key 'pissa_init' needs 'pissa_convert: true': the artifact is an adapter "
                              "on the original base, which a PiSSA adapter only fits once converted")
    if m.adapter_name_or_path and f.finetuning_type != "lora":  # as LlamaFactory: it would be quietly ignored
        raise RecipeError(f"{source}: key 'adapter_name_or_path' applies to finetuning_type: lora (got "
                          f"{f.finetuning_type}); to tune the base with that adapter in it, export the merge "
                          "(tunefactory export) and name that folder as model_name_or_path")
    if f.create_new_adapter and not m.adapter_name_or_path:
        raise RecipeError(f"{source}: key 'create_new_adapter' needs 'adapter_name_or_path' (the adapter to merge)")
    if f.create_new_adapter and m.quantization_bit:
        raise RecipeError(f"{source}: key 'create_new_adapter' merges the adapter into the base, which cannot be "
                          "done exactly on quantized weights (quantization_bit); drop it to continue training the "
                          "adapter, as LlamaFactory does on a quantized model")
    for key in ("galore", "apollo"):
        if getattr(f, f"use_{key}") and getattr(f, f"{key}_layerwise") and t.gradient_accumulation_steps > 1:
            raise RecipeError(f"{source}: key '{key}_layerwise' steps as gradients arrive; set "
                              "gradient_accumulation_steps: 1")
    if f.use_apollo and f.apollo_scale_front:
        raise RecipeError(f"{source}: key 'apollo_scale_front' is not in apollo-torch 1.0.3's APOLLOAdamW; "
                          "leave it false")
    if f.pure_bf16 and t.fp16:
        raise RecipeError(f"{source}: keys 'pure_bf16' and 'fp16' cannot both be true")
    if m.use_unsloth:
        raise RecipeError(f"{source}: key 'use_unsloth': unsloth's patched models are not built in (they need a CUDA "
                          "GPU and the unsloth package); set it false")
    if m.shift_attn:
        raise RecipeError(f"{source}: key 'shift_attn' (LongLoRA S^2-Attn) is not built in; use flash_attn or a "
                          "shorter cutoff_len")


def deepspeed_stage(path: str | None, source: str = "recipe") -> int | None:
    """The ZeRO stage a DeepSpeed config file asks for (0 when it has no zero_optimization), None without one."""
    if not path:
        return None
    import json

    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{source}: key 'deepspeed': config file not found: {path}")
    try:
        config = json.loads(read_utf8(file, "the DeepSpeed config", RecipeError))
        return int(config.get("zero_optimization", {}).get("stage", 0))
    except (ValueError, AttributeError, TypeError):
        raise RecipeError(f"{source}: key 'deepspeed': {path} is not a DeepSpeed JSON config with a "
                          "zero_optimization stage") from None


def check_launch(recipe: Recipe, source: str) -> None:
    """Multi-device options against each other and against the methods that cannot be sharded."""
    f, t, m = recipe.finetuning, recipe.training, recipe.model
    zero = deepspeed_stage(t.deepspeed, source)
    if zero is not None and (t.fsdp or t.fsdp_config):
        raise RecipeError(f"{source}: keys 'deepspeed' and 'fsdp' cannot be combined; choose one")
    if t.fsdp_config and not t.fsdp:
        raise RecipeError(f"{source}: key 'fsdp_config' needs 'fsdp' (for example 'full_shard auto_wrap')")
    if t.node_rank >= t.nnodes:
        raise RecipeError(f"{source}: key 'node_rank' must be below nnodes ({t.nnodes}), got {t.node_rank}")
    if t.nnodes > 1 and not t.master_port:
        raise RecipeError(f"{source}: key 'master_port' must be given when nnodes > 1 (every node uses the same)")
    if zero == 3 and m.quantization_bit:
        raise RecipeError(f"{source}: keys 'deepspeed' (ZeRO-3) and 'quantization_bit' cannot be combined: "
                          "bitsandbytes weights cannot be partitioned")
    if zero == 3 and recipe.rlhf.ref_model_quantization_bit:
        raise RecipeError(f"{source}: keys 'deepspeed' (ZeRO-3) and 'ref_model_quantization_bit' cannot be combined: "
                          "bitsandbytes weights cannot be partitioned")
    if zero == 3 and f.pure_bf16:
        raise RecipeError(f"{source}: keys 'pure_bf16' and 'deepspeed' (ZeRO-3) cannot be combined")
    if zero == 3 and f.pissa_init:
        raise RecipeError(f"{source}: keys 'pissa_init' and 'deepspeed' (ZeRO-3) cannot be combined")
    if zero is not None and (f.use_galore or f.use_apollo):
        raise RecipeError(f"{source}: keys '{'use_galore' if f.use_galore else 'use_apollo'}' and 'deepspeed' "
                          "cannot be combined")
    for key in ("use_muon", "use_adam_mini"):  # both read each weight as a matrix; ZeRO and FSDP hand them flat shards
        if getattr(f, key) and (zero is not None or t.fsdp):
            raise RecipeError(f"{source}: keys '{key}' and '{'deepspeed' if zero is not None else 'fsdp'}' cannot be "
                              "combined: its optimizer needs whole weight matrices, and sharding hands it flat pieces")
    if zero == 3 and f.create_new_adapter:
        raise RecipeError(f"{source}: keys 'create_new_adapter' and 'deepspeed' (ZeRO-3) cannot be combined: the "
                          "adapter cannot be merged into a partitioned base")
    if t.fsdp and m.quantization_bit:
        raise RecipeError(f"{source}: keys 'fsdp' and 'quantization_bit' cannot be combined (not supported here); use "
                          "DeepSpeed ZeRO-2 or one device for QLoRA")
    several = t.nnodes > 1 or (t.nproc_per_node or 1) > 1
    if f.stage == "ppo" and (several or zero is not None or t.fsdp):
        raise RecipeError(f"{source}: keys 'deepspeed', 'fsdp', 'nproc_per_node' and 'nnodes' launch stages pt, sft, "
                          "rm, dpo and kto; stage ppo (its own loop, not the Trainer's) trains in one process")
    if several and f.use_badam and (f.badam_mode == "ratio" or zero != 3):
        raise RecipeError(f"{source}: key 'use_badam' on several ranks needs badam_mode: layer with DeepSpeed ZeRO-3")
    if f.use_badam and f.badam_mode == "layer" and ((zero is not None and zero != 3) or t.fsdp):
        raise RecipeError(f"{source}: key 'use_badam' (badam_mode: layer) supports DeepSpeed ZeRO-3 only, as "
                          "LlamaFactory's: drop 'deepspeed'/'fsdp' or use ZeRO-3")
    if f.use_badam and f.badam_mode == "ratio" and (zero is not None or t.fsdp):
        raise RecipeError(f"{source}: key 'badam_mode': ratio runs in one plain process (its sparse gradients are "
                          "clipped by the Trainer, not by DeepSpeed or FSDP); drop 'deepspeed'/'fsdp' or use layer")
    for key in ("galore", "apollo"):
        if several and getattr(f, f"use_{key}") and getattr(f, f"{key}_layerwise"):
            raise RecipeError(f"{source}: key '{key}_layerwise' runs on one rank only (nproc_per_node: 1)")


def check_rlhf(recipe: Recipe, source: str) -> None:
    """The preference and PPO options that only fit some objectives (LlamaFactory's rules)."""
    objective, rlhf, data = recipe.finetuning.stage, recipe.rlhf, recipe.data
    if objective == "dpo" and rlhf.pref_loss != "sigmoid" and rlhf.dpo_label_smoothing > 0:
        raise RecipeError(f"{source}: key 'dpo_label_smoothing' applies to pref_loss: sigmoid only "
                          f"(got pref_loss: {rlhf.pref_loss})")
    if objective == "ppo":
        if not rlhf.reward_model:
            raise RecipeError(f"{source}: stage ppo needs 'reward_model' (an rm recipe, artifact or folder)")
        if rlhf.reward_model_type == "api":
            raise RecipeError(f"{source}: key 'reward_model_type': 'api' (an HTTP reward service) is not supported; "
                              "use lora or full")
        if rlhf.reward_model_type == "lora" and recipe.finetuning.finetuning_type != "lora":
            raise RecipeError(f"{source}: key 'reward_model_type': a lora reward model shares the policy's base "
                              "model, which needs finetuning_type: lora")
        if not recipe.finetuning.do_train:
            raise RecipeError(f"{source}: stage ppo only trains; set do_train: true")
        if recipe.finetuning.finetuning_type != "lora":
            raise RecipeError(f"{source}: stage ppo trains a LoRA policy (its reference is the base with the adapter "
                              "disabled); set finetuning_type: lora")
        for key in ("ref_model", "ref_model_quantization_bit"):
            if getattr(rlhf, key):
                raise RecipeError(f"{source}: key '{key}' applies to stage dpo or kto; stage ppo's reference is the "
                                  "base with the policy adapter disabled")
    if rlhf.ref_model_adapters:
        raise RecipeError(f"{source}: key 'ref_model_adapters' is not supported; merge the adapter into ref_model "
                          "(tunefactory export) and name that folder")
    if rlhf.reward_model_adapters:
        raise RecipeError(f"{source}: key 'reward_model_adapters' is not supported; give the rm recipe or the folder "
                          "of its adapter as 'reward_model'")
    if objective == "pt" and data.neat_packing:  # as LlamaFactory: pretraining packs plain blocks
        raise RecipeError(f"{source}: key 'neat_packing' applies to stage sft only; stage pt packs documents into "
                          "cutoff_len blocks (packing: false trains each document alone)")
    if objective not in ("pt", "sft"):
        for key in ("train_on_prompt", "mask_history", "neat_packing", "packing"):
            if getattr(data, key):
                raise RecipeError(f"{source}: key '{key}' applies to stage sft or pt, not {objective}")
        if data.streaming:
            raise RecipeError(f"{source}: key 'streaming' supports stage sft and pt only, not {objective}")


def check_interleave_probs(recipe: Recipe, source: str) -> None:
    """interleave_probs: one probability in [0, 1] per dataset, summing to 1."""
    text = recipe.data.interleave_probs
    if text is None:
        return
    try:
        probs = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise RecipeError(f"{source}: key 'interleave_probs': expected comma-separated numbers, "
                          f"got {text!r}") from None
    for key in ("dataset", "eval_dataset"):  # one eval dataset is not mixed, so needs none
        names = [n for n in (getattr(recipe.data, key) or "").split(",") if n.strip()]
        if len(probs) != len(names) and (key == "dataset" or len(names) > 1):
            raise RecipeError(f"{source}: key 'interleave_probs' gives {len(probs)} probabilities for "
                              f"{len(names)} datasets in '{key}'")
    if any(not 0 <= p <= 1 for p in probs) or abs(sum(probs) - 1) > 1e-6:
        raise RecipeError(f"{source}: key 'interleave_probs' must be probabilities summing to 1 "
                          f"(got {text!r}, sum {sum(probs):g})")
    if recipe.data.mix_strategy == "concat":
        raise RecipeError(f"{source}: key 'interleave_probs' needs mix_strategy interleave_under or "
                          "interleave_over")


def report_targets(report_to: str | list[str]) -> list[str]:
    """Extra transformers loggers the recipe asks for (MLflow is always on, so it is not one of them)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    return [n for n in names if n not in ("none", "mlflow")]


def trainer_names() -> dict[str, list[str]]:
    """transformers' scheduler and optimizer names. Importing the modules that hold them takes seconds (they
    pull in peft and bitsandbytes), so the names are kept in a cache file per transformers version."""
    import importlib.metadata
    import json
    import os

    from tasks.core.digest_cache import cache_dir

    cache = cache_dir() / f"trainer-names-{importlib.metadata.version('transformers')}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    names = {"lr_scheduler_type": [s.value for s in SchedulerType], "optim": [o.value for o in OptimizerNames]}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(names))
        tmp.replace(cache)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass  # a read-only home only costs the import next time
    return names


SCHEDULER_NEEDS = {"cosine_with_min_lr": ("min_lr", "min_lr_rate"), "warmup_stable_decay": ("num_decay_steps",)}


def check_scheduler_arguments(name: str, arguments: dict[str, Any], source: str) -> None:
    """The scheduler's arguments, checked now rather than failing after the data and model stages: what it
    requires, and (when some are given) that it takes them."""
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise RecipeError(f"{source}: key 'lr_scheduler_type': {name} steps on evaluation during training, which "
                          "TuneFactory runs as its own stage after it; choose another scheduler")
    needs = SCHEDULER_NEEDS.get(name, ())
    if needs and not set(needs) & set(arguments):
        raise RecipeError(f"{source}: key 'lr_scheduler_kwargs': {name} needs {' or '.join(needs)} "
                          f"(e.g. lr_scheduler_kwargs: {{{needs[0]}: ...}})")
    if arguments:
        import inspect

        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType  # torch: only when given

        taken = set(inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters)
        fixed = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
        if unknown := sorted(set(arguments) - (taken - fixed)):
            raise RecipeError(f"{source}: key 'lr_scheduler_kwargs': {name} takes no {', '.join(unknown)} "
                              f"(it takes {', '.join(sorted(taken - fixed)) or 'none'})")


def check_trainer_names(recipe: Recipe, source: str) -> None:
    """Names that transformers resolves at train time, checked now: scheduler, optimizer, loggers."""
    training = recipe.training
    names = trainer_names()
    for key, value, known in (
        ("lr_scheduler_type", training.lr_scheduler_type, names["lr_scheduler_type"]),
        ("optim", training.optim, names["optim"]),
    ):
        if value not in known:
            hint = did_you_mean(value, known) or f" (known: {', '.join(known)})"
            raise RecipeError(f"{source}: key '{key}': unknown value {value!r}{hint}")
    check_scheduler_arguments(training.lr_scheduler_type, training.lr_scheduler_kwargs or {}, source)
    targets = report_targets(training.report_to)
    if not targets:
        return
    from transformers.integrations import get_available_reporting_integrations  # slow to import: only when asked

    available = get_available_reporting_integrations()
    for name in targets:
        if name == "all":
            continue
        if name not in available:
            raise RecipeError(f"{source}: key 'report_to': {name!r} is not an installed logger "
                              f"(installed: {', '.join(available) or 'none'}; MLflow tracking is always on)")


class KeyNotAName(yaml.YAMLError):
    """A mapping key that YAML reads as a value: a number, a boolean (`on`, `yes`), a list."""

    def __init__(self, text: str | None, line: int):
        super().__init__(text, line)
        self.text, self.line = text, line

    def explain(self, path: Path) -> str:
        if self.text is None:
            return f"{path}: line {self.line}: a key is a name, not a list or mapping"
        quoted = f'"{self.text}"'
        return f"{path}: line {self.line}: key '{self.text}' is not a name to YAML but a value; quote it ({quoted})"


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice (plain YAML silently keeps the last)."""


def _unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str):  # `on:`, `yes:`, `1:` or `[a, b]:` read as a value, not a name
            raise KeyNotAName(key_node.value if isinstance(key_node, yaml.ScalarNode) else None,
                              key_node.start_mark.line + 1)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `--set key=value`; the value is read as YAML (numbers, booleans, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise RecipeError(f"--set {text!r}: the value is not valid YAML ({problem}); quote it") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        values = yaml.load(read_utf8(path, "the recipe", RecipeError), Loader=UniqueKeyLoader) or {}
    except KeyNotAName as exc:
        raise RecipeError(exc.explain(path)) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    overridden = dict(parse_override(item) for item in overrides)
    given_by = dict.fromkeys(overridden, "--set")  # a mistyped --set is not the file's mistake
    return Recipe.from_flat({**values, **overridden}, source=str(path), given_by=given_by)
