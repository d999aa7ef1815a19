"""Tokenize stage: aligned rows -> train/eval Arrow datasets of input_ids and labels.

Reads the tokenizer from the model artifact. For sft: chat template, prompt masking, cutoff and
optional packing (neat packing keeps samples apart). For pt: documents, packed into cutoff_len
blocks by default. Splits off a validation set (val_size) or uses eval_dataset; reports length
statistics and a preview of decoded samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from tasks.core.errors import DataError, RecipeError
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step, unkeyed
from tasks.data_report import preview_markdown
from tasks.encoding import Masking, template_overhead
from tasks.mixing import merge_parts
from tasks.objective_rows import (
    TRAIN_FORMATS,
    encode_eval,
    encode_eval_pairs,
    encode_train,
    preview_rows,
    split_stats,
)
from tasks.rows import load_rows, save_rows
from tasks.streaming import merged_aligned, training_stream
from tasks.templates import stop_token_ids
from tasks.templates.choice import TemplateChoice
from tasks.vocab import check_template_tokens

Packing = Literal["none", "blocks", "neat", "plain"]


class TokenizeConfig(StageConfig):
    objective: Literal["pt", "sft", "rm", "dpo", "kto", "ppo"]
    template: TemplateChoice
    cutoff_len: int
    train_on_prompt: bool
    mask_history: bool
    max_samples: int | None
    val_size: float | None  # None: no split (eval_dataset given, or no validation asked for)
    mix_strategy: str | None  # None: nothing to mix (one dataset per split)
    interleave_probs: tuple[float, ...] | None
    seed: int | None  # only where randomness is used: a validation split or interleaving
    packing: Packing  # pt: blocks or none; sft: neat (isolated), plain (LlamaFactory's packing) or none
    streaming: bool
    workers: int | None = unkeyed(None, "processes for map(); cannot change the rows")

    @property
    def masking(self) -> Masking:
        return Masking(self.cutoff_len, self.train_on_prompt, self.mask_history)


def packing_mode(recipe: Recipe) -> Packing:
    """The packing a recipe asks for: on by default for pretraining, off for sft (as in LlamaFactory)."""
    data = recipe.data
    if recipe.finetuning.stage == "pt":
        return "blocks" if data.packing is not False else "none"
    if data.neat_packing:
        return "neat"
    return "plain" if data.packing else "none"


def plan(recipe: Recipe, train: list[Step], evaluation: list[Step], model: Step) -> Step:
    data = recipe.data
    val_size = data.val_size if data.val_size and not evaluation and train else None
    mixes = len(train) > 1 or len(evaluation) > 1
    interleaving = mixes and data.mix_strategy != "concat"
    config = TokenizeConfig(
        objective=recipe.finetuning.stage,
        template=TemplateChoice.of(data),  # an unknown name fails at plan time, not after the model import
        cutoff_len=data.cutoff_len,
        train_on_prompt=data.train_on_prompt,
        mask_history=data.mask_history,
        max_samples=data.max_samples,
        val_size=val_size,
        mix_strategy=data.mix_strategy if mixes else None,
        interleave_probs=tuple(float(p) for p in data.interleave_probs.split(",")) if interleaving and
        data.interleave_probs else None,
        seed=recipe.training.seed if val_size or interleaving else None,
        packing=packing_mode(recipe),
        streaming=data.streaming,
        workers=data.preprocessing_num_workers,
    )
    inputs = {"model": model, **{f"train_{i}": s for i, s in enumerate(train)},
              **{f"eval_{i}": s for i, s in enumerate(evaluation)}}
    names = {name: step.locators["dataset"] for name, step in inputs.items() if name != "model"}
    return STAGE.step("tokenize", config, inputs, {"sources": stream_sources(train + evaluation), "datasets": names})


def stream_sources(aligned: list[Step]) -> dict[str, dict[str, str]]:
    """Where each streamed source is in this run, by content digest (see tasks.streaming)."""
    return {step.locators["digest"]: {"location": step.locators["location"], "where": step.locators["where"]}
            for step in aligned}


def input_names(ctx: BuildContext, prefix: str) -> list[str]:
    """The inputs named prefix0, prefix1, ... (as plan numbers them), in dataset order."""
    return sorted((n for n in ctx.inputs if n.startswith(prefix)), key=lambda n: int(n.rsplit("_", 1)[1]))


def load_aligned(ctx: BuildContext, prefix: str, config: TokenizeConfig):
    """The aligned inputs named prefix_0, prefix_1, ..., each capped at max_samples rows, merged; each row
    says which dataset it is from (a `dataset` column holding its name, for messages: encoding drops it)."""
    parts = []
    for name in input_names(ctx, prefix):
        rows = load_rows(ctx.inputs[name].part("rows"))
        limit = config.max_samples
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        parts.append(rows.add_column("dataset", [ctx.locators["datasets"].get(name, "")] * len(rows)))
    return merge_parts(parts, config.mix_strategy, config.interleave_probs, config.seed) if parts else None


def split_validation(rows, val_size: float, seed: int):
    """(train, validation) with a seeded split; val_size < 1 is a share, >= 1 a row count."""
    size = int(val_size) if val_size >= 1 else val_size
    if size >= 1 and size >= len(rows):
        raise RecipeError(f"key 'val_size': {size} validation rows asked for, but the training data has only "
                          f"{len(rows)} rows; lower val_size or use a share below 1")
    parts = rows.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def check_cutoff(tokenizer, template, config: TokenizeConfig) -> None:
    """A cutoff_len that leaves no room after the template's own prompt tokens is a recipe error."""
    if config.objective == "pt":
        return
    overhead = template_overhead(tokenizer, template)
    if overhead >= config.cutoff_len:
        raise RecipeError(f"key 'cutoff_len': {config.cutoff_len} tokens leave no room for a conversation; the "
                          f"template '{template.name}' alone takes {overhead} tokens per exchange")


def build(config: TokenizeConfig, ctx: BuildContext, out: Path) -> Built:
    import datasets
    from transformers import AutoTokenizer

    model = ctx.inputs["model"]
    tokenizer = AutoTokenizer.from_pretrained(str(model.part("model")), **remote_code(model))
    template = config.template.load(tokenizer)
    check_template_tokens(tokenizer, template)
    check_cutoff(tokenizer, template, config)
    datasets.disable_caching()  # map() would otherwise write cache files into the input artifacts
    if config.streaming:
        return build_stream(config, ctx, out, tokenizer, template)
    train = load_aligned(ctx, "train_", config)
    evaluation = load_aligned(ctx, "eval_", config)
    if config.val_size and train is not None:
        train, evaluation = split_validation(train, config.val_size, config.seed)
    stats: dict[str, Any] = {}
    layout = {"generation": "generation.json", "stats": "stats.json"}
    if train is not None:
        encoded, dropped = encode_train(train, tokenizer, template, config)
        if not len(encoded) and config.packing == "blocks":
            raise DataError(f"the training documents hold fewer tokens than one cutoff_len block "
                            f"({config.cutoff_len}); lower cutoff_len, add data, or set packing: false")
        if not len(encoded):
            raise DataError(f"no training sample keeps a trainable token at cutoff_len {config.cutoff_len}; "
                            "raise cutoff_len")
        save_rows(encoded, out / "train")
        stats["train"] = split_stats(encoded) | {"dropped_no_target": dropped}
        layout["train"] = "train"
    missing = None
    if evaluation is not None:
        written, missing = write_eval(evaluation, tokenizer, template, config, out, stats, eval_source(ctx, config))
        layout |= written
    write_generation(out, tokenizer, template)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    if train is not None:
        write_preview(preview_rows(load_rows(out / "train")), tokenizer, stats, ctx, out)
        layout["preview"] = "preview.md"
    ctx.log.info("tokenized: %s", json.dumps(stats))
    ctx.log_metrics({f"{split}_{k}": v for split, s in stats.items() for k, v in s.items()})
    info = {"train": "rows" if train is not None else None, "train_format": TRAIN_FORMATS[config.objective],
            "packed": config.packing != "none", "position_ids": config.packing in ("neat", "plain"),
            "eval_prompts": config.objective not in ("pt", "rm"), **({"eval_missing": missing} if missing else {})}
    return Built("tokenized", layout, info)


def eval_source(ctx: BuildContext, config: TokenizeConfig) -> str:
    """Where the evaluation rows come from, as an error about them names it."""
    names = [ctx.locators["datasets"].get(n, n) for n in input_names(ctx, "eval_")]
    return ', '.join(names) if names else f"the val_size split ({config.val_size})"


def write_eval(rows, tokenizer, template, config: TokenizeConfig, out: Path, stats: dict[str, Any],
               source: str) -> tuple[dict[str, str], str | None]:
    """Encode and save the evaluation split(s) (from `source`, as errors name it), adding their length statistics;
    their layout entries, and why there are no rows to score where none are left (evaluate raises it; training
    does not need them)."""
    layout, missing = {}, None
    for part, encode in (("eval", encode_eval), ("eval_pairs", encode_eval_pairs)):
        encoded = encode(rows, tokenizer, template, config)
        if encoded is None:
            continue
        if not len(encoded):
            missing = (f"{source}: no desirable rows (kto_tag true), and KTO scores perplexity and generation on "
                       "the desirable replies" if config.objective == "kto" else f"{source}: no rows to score")
            continue
        save_rows(encoded, out / part)
        stats[part] = split_stats(encoded)
        layout[part] = part
    return layout, missing


def write_preview(rows, tokenizer, stats: dict[str, Any], ctx: BuildContext, out: Path) -> None:
    """Decoded samples and statistics: preview.md in the artifact, the Prefect UI and MLflow."""
    preview = preview_markdown(tokenizer, rows, stats)
    (out / "preview.md").write_text(preview, encoding="utf-8")
    publish_preview(preview, ctx)


def stream_spec(config: TokenizeConfig, ctx: BuildContext) -> dict[str, Any]:
    """The training stream's description: aligned parts, mixing and encoding (train applies it lazily)."""

    def parts(prefix: str) -> list[dict[str, Any]]:
        return [json.loads(ctx.inputs[name].part("stream").read_text()) for name in input_names(ctx, prefix)]

    return {
        "parts": parts("train_"),
        "eval_parts": parts("eval_"),
        "mix": {"max_samples": config.max_samples, "strategy": config.mix_strategy,
                "probs": config.interleave_probs, "seed": config.seed},
        "encode": {"objective": config.objective, "template": config.template.model_dump(),
                   "cutoff_len": config.cutoff_len, "train_on_prompt": config.train_on_prompt,
                   "mask_history": config.mask_history, "packing": config.packing},
        "skip": int(config.val_size or 0),  # the stream's first rows are the validation split
    }


def build_stream(config: TokenizeConfig, ctx: BuildContext, out: Path, tokenizer, template) -> Built:
    """Streaming: describe the training stream for the train stage; materialize only the (small) eval split."""
    import datasets

    spec = stream_spec(config, ctx)
    sources = ctx.locators["sources"]
    evaluation = None
    if spec["eval_parts"]:
        evaluation = datasets.Dataset.from_list(list(merged_aligned(spec, spec["eval_parts"], sources)))
    elif spec["skip"] and spec["parts"]:
        head = merged_aligned(spec, spec["parts"], sources).take(spec["skip"])
        evaluation = datasets.Dataset.from_list(list(head))
    (out / "stream.json").write_text(json.dumps(spec, indent=1))
    layout = {"stream": "stream.json", "generation": "generation.json", "stats": "stats.json"}
    stats: dict[str, Any] = {"train": {"streaming": True, "parts": len(spec["parts"])}}
    missing = None
    if evaluation is not None and len(evaluation):
        written, missing = write_eval(evaluation, tokenizer, template, config, out, stats, eval_source(ctx, config))
        layout |= written
    sample = datasets.Dataset.from_list(list(training_stream(spec, tokenizer, sources).take(3)))
    if len(sample):
        write_preview(sample, tokenizer, stats, ctx, out)
        layout["preview"] = "preview.md"
    write_generation(out, tokenizer, template)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    info = {"train": "stream", "train_format": "supervised", "packed": config.packing != "none", "position_ids": False,
            "eval_prompts": config.objective == "sft", **({"eval_missing": missing} if missing else {})}
    return Built("tokenized", layout, info)


def write_generation(out: Path, tokenizer, template) -> None:
    """Stop and pad token ids the evaluate stage generates with."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation = {"stop_token_ids": stop_token_ids(tokenizer, template), "pad_token_id": pad}
    (out / "generation.json").write_text(json.dumps(generation))


def publish_preview(preview: str, ctx: BuildContext) -> None:
    """Show the preview in the Prefect UI (inside a task run) and on the stage's MLflow run."""
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is not None:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key="tokenized-data-preview", markdown=preview, description="Decoded samples")
    if ctx.run.mlflow_run_id:
        from tasks.core import tracking

        tracking.client().log_text(ctx.run.mlflow_run_id, preview, "preview.md")


STAGE = Stage(
    name="tokenize",
    plan=plan,
    build=build,
    code=("tasks.tokenize", "tasks.objective_rows", "tasks.encoding", "tasks.templates", "tasks.data_report",
          "tasks.packing", "tasks.mixing", "tasks.rows", "tasks.sources", "tasks.streaming", "tasks.formats",
          "tasks.vocab"),
    libraries=("transformers", "tokenizers", "datasets"),
)
