"""Tokenize stage: aligned rows -> train/eval Arrow datasets of input_ids and labels.

Reads the tokenizer from the model artifact; applies the chat template, prompt masking and
cutoff; splits off a validation set (val_size) or uses eval_dataset; records length statistics.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec
from tasks.templates import (
    IGNORE_INDEX,
    encode_pairs,
    generation_prompt,
    get_template,
    stop_token_ids,
    supervised_example,
)

STAGE = "tokenize"


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
        ["tasks.tokenize", "tasks.templates"],
        ("transformers", "tokenizers", "datasets"),
    )


def load_aligned(ctx: BuildContext, prefix: str, max_samples: int | None):
    """Concatenate the aligned inputs named prefix_0, prefix_1, ...; each capped at max_samples rows."""
    import datasets

    parts = []
    for name in sorted(n for n in ctx.inputs if n.startswith(prefix)):
        rows = datasets.load_from_disk(str(ctx.inputs[name] / "rows"))
        parts.append(rows.select(range(min(max_samples, len(rows)))) if max_samples else rows)
    return datasets.concatenate_datasets(parts) if parts else None


def split_validation(rows, val_size: float, seed: int):
    """(train, validation) with a seeded split; val_size < 1 is a share, >= 1 a row count."""
    size = int(val_size) if val_size >= 1 else val_size
    parts = rows.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def length_stats(lengths: list[int], trainable: list[int]) -> dict[str, float]:
    if not lengths:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "mean_len": round(statistics.mean(lengths), 1),
        "max_len": max(lengths),
        "trainable_share": round(sum(trainable) / max(sum(lengths), 1), 4),
    }


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.inputs["model"] / "model"))
    template = get_template(config["template"])
    cutoff = config["cutoff_len"]

    def supervised(row: dict[str, Any]) -> dict[str, Any]:
        pairs = encode_pairs(tokenizer, template, row["messages"], row["system"])
        input_ids, labels = supervised_example(pairs, cutoff, config["train_on_prompt"], config["mask_history"])
        return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}

    def for_eval(row: dict[str, Any]) -> dict[str, Any]:
        pairs = encode_pairs(tokenizer, template, row["messages"], row["system"])
        prompt = generation_prompt(pairs, cutoff)
        return {
            **supervised(row),
            "prompt_ids": prompt,
            "label_text": row["messages"][-1]["content"],
            "prompt_text": tokenizer.decode(prompt),
        }

    datasets.disable_caching()  # map() would otherwise write cache files into the input artifacts
    train = load_aligned(ctx, "train_", config["max_samples"])
    evaluation = load_aligned(ctx, "eval_", config["max_samples"])
    if evaluation is None and config["val_size"] and train is not None:
        train, evaluation = split_validation(train, config["val_size"], config["seed"])
    stats: dict[str, Any] = {}
    workers = ctx.runtime.num_workers
    if train is not None:
        encoded = train.map(supervised, remove_columns=train.column_names, num_proc=workers, desc="tokenize train")
        has_target = [any(t != IGNORE_INDEX for t in labels) for labels in encoded["labels"]]
        dropped = has_target.count(False)
        encoded = encoded.select([i for i, ok in enumerate(has_target) if ok])  # no trainable token: no signal
        encoded.save_to_disk(str(out / "train"))
        lengths = [len(ids) for ids in encoded["input_ids"]]
        trainable = [sum(t != IGNORE_INDEX for t in labels) for labels in encoded["labels"]]
        stats["train"] = {**length_stats(lengths, trainable), "dropped_no_target": dropped}
    if evaluation is not None:
        encoded = evaluation.map(
            for_eval, remove_columns=evaluation.column_names, num_proc=workers, desc="tokenize eval"
        )
        encoded.save_to_disk(str(out / "eval"))
        lengths = [len(ids) for ids in encoded["input_ids"]]
        trainable = [sum(t != IGNORE_INDEX for t in labels) for labels in encoded["labels"]]
        stats["eval"] = length_stats(lengths, trainable)
    generation = {
        "stop_token_ids": stop_token_ids(tokenizer, template),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    (out / "generation.json").write_text(json.dumps(generation))
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    ctx.log.info("tokenized: %s", json.dumps(stats))
    ctx.log_metrics({f"{split}_{k}": v for split, s in stats.items() for k, v in s.items()})
    return {"stats": stats}


@task(name="tokenize", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def tokenize_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
