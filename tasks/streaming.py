"""Streaming mode: rows are read lazily at train time and never materialized.

The data stages publish descriptions instead of rows: fetch a `source.json` (the load_dataset
arguments), align a `stream.json` (source plus converter settings, after checking the first rows),
tokenize a `stream.json` (the parts plus encoding settings). Keys stay content-based: the source
digest is in fetch's key. This module rebuilds the lazy pipeline from those descriptions with the
same converters and encoders the materialized path uses.
"""

from __future__ import annotations

from typing import Any

from tasks.core.errors import DataError
from tasks.encoding import encode_document, encode_supervised, truncated_document
from tasks.formats import RowError, convert_row
from tasks.formats.common import unified
from tasks.mixing import merge_parts
from tasks.templates import IGNORE_INDEX, get_template

CHECKED_ROWS = 100  # rows align reads up front, so a bad file fails before training starts
UNIFIED = [*unified([], []), "row"]  # the aligned columns that encoding replaces


def open_source(source: dict[str, Any]):
    """The raw rows of a fetched source as an IterableDataset (num_samples applied)."""
    import datasets

    rows = datasets.load_dataset(**source["load"], streaming=True)
    return rows.take(source["num_samples"]) if source.get("num_samples") else rows


def convert_or_flag(row: dict[str, Any], index: int, part: dict[str, Any]) -> dict[str, Any]:
    """One raw row in the unified schema, or flagged for dropping (on_invalid_row: drop)."""
    try:
        converted = convert_row(row, part["formatting"], part["kind"], part["columns"], part["tags"])
        return {**converted, "row": index, "keep": True}
    except RowError as exc:
        if part["on_invalid_row"] == "fail":
            raise DataError(f"{part['where']}, row {index}: {exc}") from None
        return {**unified([], []), "row": index, "keep": False}


def aligned_stream(part: dict[str, Any]):
    """A part's rows in the unified schema; invalid rows raise or are dropped, as the recipe says."""
    rows = open_source(part["source"])
    converted = rows.map(convert_or_flag, with_indices=True, fn_kwargs={"part": part},
                         remove_columns=part["present_columns"])
    return converted.filter(lambda row: row["keep"]).remove_columns(["keep"])


def check_first_rows(part: dict[str, Any]) -> int:
    """Convert the first rows now so a malformed source fails at align, not mid-training."""
    checked = 0
    for index, row in enumerate(open_source(part["source"]).take(CHECKED_ROWS)):
        convert_or_flag(row, index, part)
        checked += 1
    return checked


def merged_aligned(parts: list[dict[str, Any]], config: dict[str, Any]):
    """All parts' aligned streams, each capped at max_samples, merged by mix_strategy."""
    streams = [aligned_stream(part) for part in parts]
    if config["max_samples"]:
        streams = [stream.take(config["max_samples"]) for stream in streams]
    return merge_parts(streams, config["mix_strategy"], config["interleave_probs"], config["seed"])


def training_stream(spec: dict[str, Any], tokenizer, shuffle: bool = True):
    """The tokenized (and, for training, shuffled) stream that a tokenize stream.json describes."""
    config = spec["config"]
    rows = merged_aligned(spec["parts"], config)
    if spec.get("skip"):
        rows = rows.skip(spec["skip"])  # the first rows went to the validation split
    if config["stage"] == "pt":
        encoded = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, remove_columns=UNIFIED)
        encoded = encoded.map(truncated_document, fn_kwargs={"cutoff_len": config["cutoff_len"]})
    else:
        template = get_template(config["template"])
        encoded = rows.map(encode_supervised, remove_columns=UNIFIED,
                           fn_kwargs={"tokenizer": tokenizer, "template": template, "config": config})
        encoded = encoded.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]))
    return encoded.shuffle(seed=config["seed"], buffer_size=config["buffer_size"]) if shuffle else encoded
