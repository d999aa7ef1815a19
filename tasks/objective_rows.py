"""What each training objective learns from, encoded from aligned rows (the tokenize stage saves these).

| objective | training rows (`train_format`) | evaluation rows |
|---|---|---|
| pt | documents, packed into blocks (`supervised`) | documents (perplexity) |
| sft | conversations, prompt masked (`supervised`) | prompt + reference reply (perplexity, generation) |
| rm | chosen/rejected pairs (`pairwise`) | pairs (reward accuracy) |
| dpo | chosen/rejected pairs (`pairwise`) | pairs (preference accuracy) and prompt + chosen reply |
| kto | reply + label, with a mismatched reply for the KL term (`feedback`) | prompt + desirable reply |
| ppo | prompts to sample replies for (`prompts`) | prompt + reference reply |
"""

from __future__ import annotations

from typing import Any

from tasks.data_report import length_stats
from tasks.encoding import (
    encode_document,
    encode_feedback,
    encode_for_eval,
    encode_pairwise,
    encode_prompt,
    encode_supervised,
    truncated_document,
)
from tasks.packing import neat_pack, pack_pretraining
from tasks.templates import IGNORE_INDEX

TRAIN_FORMATS = {"pt": "supervised", "sft": "supervised", "rm": "pairwise", "dpo": "pairwise", "kto": "feedback",
                 "ppo": "prompts"}
PAIRWISE = ("rm", "dpo")


def has_target(labels: list[int]) -> bool:
    return any(t != IGNORE_INDEX for t in labels)


def pack_supervised(encoded, cutoff_len: int, isolate: bool):
    """Several samples per row. isolate: positions restart per sample, so attention stays inside it;
    otherwise (plain packing, as LlamaFactory's) positions run on and attention crosses samples."""
    import datasets

    rows = neat_pack(list(zip(encoded["input_ids"], encoded["labels"], strict=True)), cutoff_len)
    if not isolate:
        for row in rows:
            row["position_ids"] = list(range(len(row["input_ids"])))
    return datasets.Dataset.from_list(rows)


def encode_train(rows, tokenizer, template, config):
    """Training rows in the objective's format, and how many were dropped for having no trainable token."""
    import datasets

    cutoff, workers = config.cutoff_len, config.workers
    arguments = {"remove_columns": rows.column_names, "num_proc": workers}
    objective = config.objective
    if objective == "pt":
        docs = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, desc="tokenize documents", **arguments)
        if config.packing == "blocks":
            blocks = pack_pretraining(docs["input_ids"], cutoff)
        else:
            blocks = [ids[:cutoff] for ids in docs["input_ids"]]
        return datasets.Dataset.from_dict({"input_ids": blocks, "labels": blocks}), 0
    if objective == "ppo":
        prompts = rows.map(encode_prompt, fn_kwargs={"tokenizer": tokenizer, "template": template,
                                                     "cutoff_len": cutoff}, desc="tokenize prompts", **arguments)
        return prompts, 0
    if objective == "kto":  # one batch: the mismatched replies for the KL term rotate through the whole split
        encoded = rows.map(encode_feedback, batched=True, batch_size=None, desc="tokenize feedback",
                           fn_kwargs={"tokenizer": tokenizer, "template": template, "cutoff_len": cutoff},
                           remove_columns=rows.column_names)
        keep = [i for i, labels in enumerate(encoded["labels"]) if has_target(labels)]
    elif objective in PAIRWISE:
        encoded = rows.map(encode_pairwise, fn_kwargs={"tokenizer": tokenizer, "template": template,
                                                       "cutoff_len": cutoff}, desc="tokenize pairs", **arguments)
        keep = [i for i, (c, r) in enumerate(zip(encoded["chosen_labels"], encoded["rejected_labels"], strict=True))
                if has_target(c) and has_target(r)]
    else:
        encoded = rows.map(encode_supervised, desc="tokenize train", **arguments,
                           fn_kwargs={"tokenizer": tokenizer, "template": template, "masking": config.masking})
        keep = [i for i, labels in enumerate(encoded["labels"]) if has_target(labels)]
    dropped = len(encoded) - len(keep)
    encoded = encoded.select(keep)  # a sample with no trainable token carries no signal
    if config.packing in ("neat", "plain"):
        encoded = pack_supervised(encoded, cutoff, isolate=config.packing == "neat")
    return encoded, dropped


def encode_eval(rows, tokenizer, template, config):
    """Evaluation rows for perplexity and generation, or None where the objective has none (rm)."""
    arguments = {"remove_columns": rows.column_names, "num_proc": config.workers}
    if config.objective == "pt":
        docs = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, desc="tokenize eval documents",
                        **arguments)
        return docs.map(truncated_document, fn_kwargs={"cutoff_len": config.cutoff_len})
    if config.objective == "rm":
        return None
    if config.objective == "kto":  # the reference replies are the desirable ones
        rows = rows.filter(lambda row: bool(row["kto_tag"]))
        arguments["remove_columns"] = rows.column_names
    return rows.map(encode_for_eval, fn_kwargs={"tokenizer": tokenizer, "template": template,
                                                "masking": config.masking}, desc="tokenize eval", **arguments)


def encode_eval_pairs(rows, tokenizer, template, config):
    """Evaluation pairs for preference metrics (rm, dpo), or None."""
    if config.objective not in PAIRWISE:
        return None
    return rows.map(encode_pairwise, remove_columns=rows.column_names, num_proc=config.workers,
                    fn_kwargs={"tokenizer": tokenizer, "template": template, "cutoff_len": config.cutoff_len},
                    desc="tokenize eval pairs")


def split_stats(rows) -> dict[str, Any]:
    """Length statistics of a tokenized split, whatever its format (pairs are measured on the chosen side)."""
    ids_column = "chosen_ids" if "chosen_ids" in rows.column_names else "input_ids"
    labels_column = "chosen_labels" if ids_column == "chosen_ids" else "labels"
    lengths = [len(ids) for ids in rows[ids_column]]
    if labels_column not in rows.column_names:  # prompts: nothing is trained on directly
        return length_stats(lengths, [0] * len(lengths))
    trainable = [sum(t != IGNORE_INDEX for t in labels) for labels in rows[labels_column]]
    return length_stats(lengths, trainable)


def preview_rows(rows, count: int = 3) -> list[dict[str, list[int]]]:
    """The first rows as input_ids/labels, whatever the format (pairs show their chosen side, prompts no labels)."""
    shown = []
    for row in rows.select(range(min(count, len(rows)))):
        if "chosen_ids" in row:
            shown.append({"input_ids": row["chosen_ids"], "labels": row["chosen_labels"]})
        else:
            shown.append({"input_ids": row["input_ids"], "labels": row.get("labels") or [IGNORE_INDEX] * len(
                row["input_ids"])})
    return shown
