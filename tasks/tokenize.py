"""Tokenize stage: aligned rows -> train/eval Arrow datasets of input_ids and labels.

Reads the tokenizer from the model artifact. For sft: chat template, prompt masking, cutoff and
optional packing (neat_packing keeps samples apart). For pt: documents, packed into cutoff_len
blocks by default. Splits off a validation set (val_size) or uses eval_dataset; reports length
statistics, padding share and a preview of decoded samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec
from tasks.data_report import length_stats, preview_markdown, shuffled_padding_share
from tasks.encoding import encode_document, encode_for_eval, encode_supervised, truncated_document
from tasks.mixing import merge_parts
from tasks.packing import neat_pack, pack_pretraining
from tasks.streaming import merged_aligned, training_stream
from tasks.templates import IGNORE_INDEX, get_template, stop_token_ids

STAGE = "tokenize"
CODE = ["tasks.tokenize", "tasks.encoding", "tasks.templates", "tasks.data_report", "tasks.packing", "tasks.mixing",
        "tasks.streaming", "tasks.formats"]


def plan(recipe, train: list[StageSpec], evaluation: list[StageSpec], model: StageSpec) -> StageSpec:
    get_template(recipe.data.template)  # fail at plan time, not after the model import
    inputs = {
        "model": model,
        **{f"train_{i}": s for i, s in enumerate(train)},
        **{f"eval_{i}": s for i, s in enumerate(evaluation)},
    }
    return make_spec(
        STAGE,
        "tokenize",
        recipe.slice_for(STAGE),
        inputs,
        CODE,
        ("transformers", "tokenizers", "datasets"),
    )


def input_names(ctx: BuildContext, prefix: str) -> list[str]:
    """The inputs named prefix0, prefix1, ... (as plan numbers them), in dataset order."""
    return sorted((n for n in ctx.inputs if n.startswith(prefix)), key=lambda n: int(n.rsplit("_", 1)[1]))


def load_aligned(ctx: BuildContext, prefix: str, config: dict[str, Any]):
    """The aligned inputs named prefix_0, prefix_1, ..., each capped at max_samples rows, merged."""
    import datasets

    parts = []
    for name in input_names(ctx, prefix):
        rows = datasets.load_from_disk(str(ctx.inputs[name] / "rows"))
        limit = config["max_samples"]
        parts.append(rows.select(range(min(limit, len(rows)))) if limit else rows)
    return merge_parts(parts, config["mix_strategy"], config["interleave_probs"], config["seed"]) if parts else None


def split_validation(rows, val_size: float, seed: int):
    """(train, validation) with a seeded split; val_size < 1 is a share, >= 1 a row count."""
    size = int(val_size) if val_size >= 1 else val_size
    parts = rows.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def pack_supervised(encoded, cutoff_len: int, isolate: bool):
    """Several samples per row. isolate: positions restart per sample, so attention stays inside it;
    otherwise (plain packing, as LlamaFactory's) positions run on and attention crosses samples."""
    import datasets

    rows = neat_pack(list(zip(encoded["input_ids"], encoded["labels"], strict=True)), cutoff_len)
    if not isolate:
        for row in rows:
            row["position_ids"] = list(range(len(row["input_ids"])))
    return datasets.Dataset.from_list(rows)


def packing_enabled(config: dict[str, Any]) -> bool:
    """packing defaults to on for pretraining and off for sft, as in LlamaFactory."""
    return config["packing"] if config["packing"] is not None else config["stage"] == "pt"


def encode_train(rows, tokenizer, template, config: dict[str, Any], workers: int | None):
    """Training rows (input_ids, labels, position_ids when packed) and how many were dropped."""
    import datasets

    cutoff = config["cutoff_len"]
    if config["stage"] == "pt":
        docs = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, remove_columns=rows.column_names,
                        num_proc=workers, desc="tokenize documents")
        if packing_enabled(config):
            blocks = pack_pretraining(docs["input_ids"], cutoff, tokenizer.eos_token_id)
        else:
            blocks = [ids[:cutoff] for ids in docs["input_ids"]]
        return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}), 0
    encoded = rows.map(encode_supervised, fn_kwargs={"tokenizer": tokenizer, "template": template, "config": config},
                       remove_columns=rows.column_names, num_proc=workers, desc="tokenize train")
    keep = [i for i, labels in enumerate(encoded["labels"]) if any(t != IGNORE_INDEX for t in labels)]
    dropped = len(encoded) - len(keep)
    encoded = encoded.select(keep)  # a sample with no trainable token carries no signal
    if config["neat_packing"] or packing_enabled(config):
        encoded = pack_supervised(encoded, cutoff, isolate=config["neat_packing"])
    return encoded, dropped


def encode_eval(rows, tokenizer, template, config: dict[str, Any], workers: int | None):
    """Evaluation rows: labels for perplexity and, for sft, the generation prompt and reference reply."""
    if config["stage"] == "pt":
        docs = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, remove_columns=rows.column_names,
                        num_proc=workers, desc="tokenize eval documents")
        return docs.map(truncated_document, fn_kwargs={"cutoff_len": config["cutoff_len"]})
    return rows.map(encode_for_eval, fn_kwargs={"tokenizer": tokenizer, "template": template, "config": config},
                    remove_columns=rows.column_names, num_proc=workers, desc="tokenize eval")


def split_stats(rows) -> tuple[dict[str, Any], list[int]]:
    """Length statistics of a tokenized split, and the row lengths they came from."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    trainable = [sum(t != IGNORE_INDEX for t in labels) for labels in rows["labels"]]
    return length_stats(lengths, trainable), lengths


def write_eval(rows, tokenizer, template, config: dict[str, Any], workers: int | None, out: Path) -> dict[str, Any]:
    """Encode and save the evaluation split; its length statistics."""
    encoded = encode_eval(rows, tokenizer, template, config, workers)
    encoded.save_to_disk(str(out / "eval"))
    return split_stats(encoded)[0]


def write_preview(rows, tokenizer, stats: dict[str, Any], ctx: BuildContext, out: Path) -> None:
    """Decoded samples and statistics: preview.md in the artifact, the Prefect UI and MLflow."""
    preview = preview_markdown(tokenizer, rows, stats)
    (out / "preview.md").write_text(preview)
    publish_preview(preview, ctx)


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.inputs["model"] / "model"))
    template = get_template(config["template"])
    workers = ctx.runtime.num_workers
    datasets.disable_caching()  # map() would otherwise write cache files into the input artifacts
    if config["streaming"]:
        return build_stream(config, ctx, out, tokenizer, template)
    train = load_aligned(ctx, "train_", config)
    evaluation = load_aligned(ctx, "eval_", config)
    if evaluation is None and config["val_size"] and train is not None:
        train, evaluation = split_validation(train, config["val_size"], config["seed"])
    stats: dict[str, Any] = {}
    if train is not None:
        encoded, dropped = encode_train(train, tokenizer, template, config, workers)
        encoded.save_to_disk(str(out / "train"))
        stats["train"], lengths = split_stats(encoded)
        padding = shuffled_padding_share(lengths, config["per_device_train_batch_size"], config["seed"])
        stats["train"] |= {"dropped_no_target": dropped, "padding_share": padding}
    if evaluation is not None:
        stats["eval"] = write_eval(evaluation, tokenizer, template, config, workers, out)
    write_generation(out, tokenizer, template)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    if train is not None:
        write_preview(datasets.load_from_disk(str(out / "train")), tokenizer, stats, ctx, out)
    ctx.log.info("tokenized: %s", json.dumps(stats))
    ctx.log_metrics({f"{split}_{k}": v for split, s in stats.items() for k, v in s.items()})
    return {"stats": stats}


def build_stream(config: dict[str, Any], ctx: BuildContext, out: Path, tokenizer, template) -> dict[str, Any]:
    """Streaming: describe the training stream for the train stage; materialize only the (small) eval split."""
    import datasets

    def parts(prefix: str) -> list[dict[str, Any]]:
        return [json.loads((ctx.inputs[name] / "stream.json").read_text()) for name in input_names(ctx, prefix)]

    spec = {"parts": parts("train_"), "config": config, "skip": 0}
    eval_parts = parts("eval_")
    evaluation = None
    if eval_parts:
        evaluation = datasets.Dataset.from_list(list(merged_aligned(eval_parts, config)))
    elif config["val_size"] and spec["parts"]:
        spec["skip"] = int(config["val_size"])  # the stream's first rows are the validation split
        evaluation = datasets.Dataset.from_list(list(merged_aligned(spec["parts"], config).take(spec["skip"])))
    (out / "stream.json").write_text(json.dumps(spec))
    stats: dict[str, Any] = {"train": {"streaming": True, "parts": len(spec["parts"])}}
    if evaluation is not None and len(evaluation):
        stats["eval"] = write_eval(evaluation, tokenizer, template, config, ctx.runtime.num_workers, out)
    sample = datasets.Dataset.from_list(list(training_stream(spec, tokenizer, shuffle=False).take(3)))
    if len(sample):
        write_preview(sample, tokenizer, stats, ctx, out)
    write_generation(out, tokenizer, template)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return {"stats": stats}


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
    if ctx.runtime.mlflow_run_id:
        from tasks.core import tracking

        tracking.client().log_text(ctx.runtime.mlflow_run_id, preview, "preview.md")


@task(name="tokenize", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def tokenize_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
