"""Align stage: a fetched dataset's rows in the unified schema that tokenize consumes.

Unified row (see tasks.formats): `prompt` and `response` as lists of {role, content}, `system`, `tools`
(a JSON string), `kto_tag`, `text` (pretraining documents), and `file` and `row` (the row's file in a folder
source, "" for a one-file source, and its row in that file, so later errors can point back at it). An
invalid row stops the run with its location, or, with `on_invalid_row: drop`, is dropped and counted in
the manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from tasks.core.errors import DataError
from tasks.core.recipe import Recipe
from tasks.core.registry import DatasetEntry
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step, unkeyed
from tasks.formats import MEDIA, RowError, convert_row, dataset_kind, field_columns
from tasks.formats.common import unified
from tasks.rows import load_rows, save_rows
from tasks.sources import ORIGIN_COLUMNS, SOURCE_FILE, SOURCE_ROW, open_source, row_origin
from tasks.streaming import check_first_rows

EXAMPLES = 5  # dropped rows quoted in the manifest, enough to find the pattern


class AlignConfig(StageConfig):
    formatting: Literal["alpaca", "sharegpt", "openai"]
    kind: Literal["sft", "preference", "kto", "pretrain"]
    columns: dict[str, str | None]
    defaulted: tuple[str, ...]  # optional column fields filled by a default, which the data may lack
    tags: dict[str, str | None]
    on_invalid_row: Literal["fail", "drop"]
    workers: int | None = unkeyed(None, "processes for map(); cannot change the rows")


def plan(entry: DatasetEntry, fetched: Step, recipe: Recipe) -> Step:
    columns = entry.column_map()
    for media in MEDIA:
        if columns.get(media):
            raise DataError(
                f"dataset '{entry.name}': column '{columns[media]}' ({media}) is multimodal input, which this "
                f"version does not train on; remove '{media}' from its 'columns' in {entry.registry_file}"
            )
    config = AlignConfig(
        formatting=entry.formatting,
        kind=dataset_kind(entry.formatting, columns, entry.ranking),
        columns=columns,
        defaulted=tuple(entry.defaulted_columns()),
        tags=entry.tag_map(),
        on_invalid_row=recipe.data.on_invalid_row,
        workers=recipe.data.preprocessing_num_workers,
    )
    locators = {"where": fetched.locators["where"], "location": fetched.locators["path"],
                "digest": fetched.config.source, "dataset": f"dataset '{entry.name}'"}
    return STAGE.step(f"align[{entry.name}]", config, {"rows": fetched}, locators)


def usable_columns(config: AlignConfig, present: list[str], where: str) -> dict[str, str | None]:
    """The column map the converters read; a column the dataset needs but lacks is a DataError."""
    required, optional = field_columns(config.formatting, config.kind)
    columns: dict[str, str | None] = dict.fromkeys(config.columns)
    for field in (*required, *optional):
        column = config.columns.get(field)
        if not column:
            if field in required:
                raise DataError(f"{where}: no column is set for the '{field}' field; set it in 'columns'")
            continue
        if column in present:
            columns[field] = column
        elif field in required or field not in config.defaulted:  # a defaulted optional column may be absent
            raise DataError(
                f"{where}: column '{column}' (the '{field}' field) not found; "
                f"columns present: {present}; set 'columns' in dataset_info.json"
            )
    return columns


def features(checked: bool):
    """Arrow types of the unified schema, given up front so invalid placeholders cannot skew them."""
    import datasets

    message = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    names = {"prompt": message, "response": message, "system": datasets.Value("string"),
             "tools": datasets.Value("string"), "kto_tag": datasets.Value("bool"), "text": datasets.Value("string"),
             "file": datasets.Value("string"), "row": datasets.Value("int64")}
    if checked:
        names |= {"invalid": datasets.Value("string"), "reason": datasets.Value("string")}
    return datasets.Features(names)


def build(config: AlignConfig, ctx: BuildContext, out: Path) -> Built:
    import datasets

    where = ctx.locators["where"]
    fetched = ctx.inputs["rows"]
    if fetched.kind == "stream":
        return publish_stream(config, ctx, out, where)
    datasets.disable_caching()  # map() would otherwise write its cache file into the input artifact
    rows = load_rows(fetched.part("rows"))
    columns = usable_columns(config, [c for c in rows.column_names if c not in ORIGIN_COLUMNS], where)
    drop = config.on_invalid_row == "drop"

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        origin = {"file": row[SOURCE_FILE], "row": row[SOURCE_ROW]}
        try:
            converted = convert_row(row, config.formatting, config.kind, columns, config.tags)
            return {**converted, **origin, "invalid": "", "reason": ""}
        except RowError as exc:
            if not drop:
                raise DataError(f"{where}, {row_origin(row)}: {exc}") from None
            return {**unified([], []), **origin, "invalid": f"{row_origin(row)}: {exc}", "reason": exc.reason}

    aligned = rows.map(convert, remove_columns=rows.column_names, features=features(checked=True),
                       num_proc=config.workers)
    invalid = aligned["invalid"]
    reasons = Counter(reason for reason in aligned["reason"] if reason)
    dropped = [message for message in invalid if message]
    if dropped and len(dropped) == len(aligned):
        raise DataError(f"{where}: all {len(aligned)} rows are invalid, e.g. {dropped[0]}")
    if dropped:
        aligned = aligned.select([i for i, message in enumerate(invalid) if not message])
        ctx.log.warning("%s: dropped %d invalid rows of %d: %s", where, len(dropped), len(invalid), dict(reasons))
    aligned = aligned.remove_columns(["invalid", "reason"])
    save_rows(aligned, out / "rows")
    ctx.log.info("%s: aligned %d %s rows", where, len(aligned), config.kind)
    info = {"rows": len(aligned), "dataset_kind": config.kind, "dropped_invalid": len(dropped),
            "drop_reasons": dict(reasons.most_common()), "drop_examples": dropped[:EXAMPLES]}
    return Built("rows", {"rows": "rows"}, info)


def publish_stream(config: AlignConfig, ctx: BuildContext, out: Path, where: str) -> Built:
    """Streaming: check the first rows now and publish the converter settings that training applies lazily."""
    source = json.loads(ctx.inputs["rows"].part("source").read_text())
    location = ctx.locators["location"]
    present = [c for c in next(iter(open_source(source, location, where))) if c not in ORIGIN_COLUMNS]
    part = {"source": source, "formatting": config.formatting, "kind": config.kind, "tags": config.tags,
            "columns": usable_columns(config, present, where), "on_invalid_row": config.on_invalid_row,
            "present_columns": present}
    checked = check_first_rows(part, location, where)
    (out / "stream.json").write_text(json.dumps(part, indent=1))
    ctx.log.info("%s: streaming; checked the first %d rows", where, checked)
    return Built("stream", {"stream": "stream.json"}, {"checked_rows": checked, "dataset_kind": config.kind})


STAGE = Stage(
    name="align",
    plan=plan,
    build=build,
    code=("tasks.align", "tasks.formats", "tasks.rows", "tasks.sources", "tasks.streaming"),
    libraries=("datasets",),
)
