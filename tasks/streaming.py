"""Streaming mode: rows are read lazily at train time and never materialized.

The data stages publish descriptions instead of rows: fetch a `source.json` (how to open the source),
align a `stream.json` (source plus converter settings, after checking the first rows), tokenize a
`stream.json` (the parts plus mixing and encoding settings). Descriptions hold no file locations:
the run's plan supplies where each source is now (`Sources`: content digest -> location and display
name), so a moved file is found and keys stay content-based. This module rebuilds the lazy pipeline
from those descriptions with the same converters and encoders the materialized path uses.
"""

from __future__ import annotations

from typing import Any

from tasks.core.errors import DataError
from tasks.encoding import Masking, document_blocks, encode_document, encode_supervised, truncated_document
from tasks.formats import RowError, convert_row
from tasks.formats.common import unified
from tasks.mixing import merge_parts
from tasks.sources import ORIGIN_COLUMNS, SOURCE_FILE, SOURCE_ROW, open_source, row_origin
from tasks.templates import IGNORE_INDEX
from tasks.templates.choice import TemplateChoice

CHECKED_ROWS = 100  # rows align reads up front, so a bad file fails before training starts
PACKED_DOCUMENTS = 1000  # pt documents packed together (LlamaFactory's preprocessing_batch_size); tails dropped
UNIFIED = [*unified([], []), "file", "row", "dataset"]  # the aligned columns that encoding replaces
Sources = dict[str, dict[str, str]]  # source digest -> {"location": path, "where": "dataset 'x' (path)"}


def convert_or_flag(row: dict[str, Any], part: dict[str, Any], where: str) -> dict[str, Any]:
    """One raw row in the unified schema, or flagged for dropping (on_invalid_row: drop)."""
    origin = {"file": row[SOURCE_FILE], "row": row[SOURCE_ROW]}
    try:
        converted = convert_row(row, part["formatting"], part["kind"], part["columns"], part["tags"])
        return {**converted, **origin, "dataset": where, "keep": True}
    except RowError as exc:
        if part["on_invalid_row"] == "fail":
            raise DataError(f"{where}, {row_origin(row)}: {exc}") from None
        return {**unified([], []), **origin, "dataset": where, "keep": False}


def located(part: dict[str, Any], sources: Sources) -> tuple[str, str]:
    """(location, display name) of an aligned part's source in this run."""
    found = sources[part["source"]["source"]]
    return found["location"], found["where"]


def aligned_stream(part: dict[str, Any], sources: Sources):
    """A part's rows in the unified schema; invalid rows raise or are dropped, as the recipe says."""
    location, where = located(part, sources)
    rows = open_source(part["source"], location, where)
    converted = rows.map(convert_or_flag, fn_kwargs={"part": part, "where": where},
                         remove_columns=[*part["present_columns"], *ORIGIN_COLUMNS])
    return converted.filter(lambda row: row["keep"]).remove_columns(["keep"])


def check_first_rows(part: dict[str, Any], location: str, where: str) -> int:
    """Convert the first rows now so a malformed source fails at align, not mid-training."""
    checked = 0
    for row in open_source(part["source"], location, where).take(CHECKED_ROWS):
        convert_or_flag(row, part, where)
        checked += 1
    return checked


def merged_aligned(spec: dict[str, Any], parts: list[dict[str, Any]], sources: Sources):
    """All parts' aligned streams, each capped at max_samples, merged by the spec's mixing settings."""
    mix = spec["mix"]
    streams = [aligned_stream(part, sources) for part in parts]
    if mix["max_samples"]:
        streams = [stream.take(mix["max_samples"]) for stream in streams]
    return merge_parts(streams, mix["strategy"], mix["probs"], mix["seed"])


def training_stream(spec: dict[str, Any], tokenizer, sources: Sources, shuffle_buffer: int | None = None,
                    seed: int = 0):
    """The tokenized (and, given a buffer, shuffled) stream that a tokenize stream.json describes."""
    rows = merged_aligned(spec, spec["parts"], sources)
    if spec["skip"]:
        rows = rows.skip(spec["skip"])  # the first rows went to the validation split
    encode = spec["encode"]
    masking = Masking(encode["cutoff_len"], encode["train_on_prompt"], encode["mask_history"])
    if encode["objective"] == "pt":
        encoded = rows.map(encode_document, fn_kwargs={"tokenizer": tokenizer}, remove_columns=UNIFIED)
        if encode["packing"] == "blocks":
            encoded = encoded.map(document_blocks, batched=True, batch_size=PACKED_DOCUMENTS,
                                  remove_columns=["input_ids"], fn_kwargs={"cutoff_len": masking.cutoff_len})
        else:
            encoded = encoded.map(truncated_document, fn_kwargs={"cutoff_len": masking.cutoff_len})
    else:
        template = TemplateChoice(**encode["template"]).load(tokenizer)
        encoded = rows.map(encode_supervised, remove_columns=UNIFIED,
                           fn_kwargs={"tokenizer": tokenizer, "template": template, "masking": masking})
        encoded = encoded.filter(lambda row: any(t != IGNORE_INDEX for t in row["labels"]))
    return encoded.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else encoded
