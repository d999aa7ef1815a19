"""Align stage: a fetched dataset's rows in the unified schema that tokenize consumes.

Unified row (see tasks.formats): `prompt` and `response` as lists of {role, content}, `system`, `tools`
(a JSON string), `kto_tag`, `text` (pretraining documents), and `row` (the source row index, so later
errors can point back at the file). An invalid row stops the run with its location, or, with
`on_invalid_row: drop`, is dropped and counted in the manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.errors import DataError
from tasks.core.recipe import Recipe
from tasks.core.registry import DatasetEntry
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec
from tasks.formats import MEDIA, RowError, convert_row, dataset_kind, field_columns
from tasks.formats.common import unified
from tasks.streaming import check_first_rows, open_source

STAGE = "align"
EXAMPLES = 5  # dropped rows quoted in the manifest, enough to find the pattern


def plan(entry: DatasetEntry, fetched: StageSpec, recipe: Recipe) -> StageSpec:
    columns = entry.column_map()
    for media in MEDIA:
        if columns.get(media):
            raise DataError(
                f"dataset '{entry.name}': column '{columns[media]}' ({media}) is multimodal input, which this "
                f"version does not train on; remove '{media}' from its 'columns' in {entry.registry_file}"
            )
    config = {
        "formatting": entry.formatting,
        "kind": dataset_kind(entry.formatting, columns, entry.ranking),
        "columns": columns,
        "defaulted": entry.defaulted_columns(),
        "tags": entry.tag_map(),
        **recipe.slice_for(STAGE),
    }
    locators = {"name": entry.name, "source": entry.description}
    code = ["tasks.align", "tasks.formats", "tasks.streaming"]
    return make_spec(STAGE, f"align[{entry.name}]", config, {"rows": fetched}, code, ("datasets",), locators)


def usable_columns(config: dict[str, Any], present: list[str], where: str) -> dict[str, str | None]:
    """The column map the converters read; a column the dataset needs but lacks is a DataError."""
    required, optional = field_columns(config["formatting"], config["kind"])
    columns: dict[str, str | None] = dict.fromkeys(config["columns"])
    for field in (*required, *optional):
        column = config["columns"].get(field)
        if not column:
            if field in required:
                raise DataError(f"{where}: no column is set for the '{field}' field; set it in 'columns'")
            continue
        if column in present:
            columns[field] = column
        elif field in required or field not in config["defaulted"]:  # a defaulted optional column may be absent
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
             "row": datasets.Value("int64")}
    if checked:
        names |= {"invalid": datasets.Value("string"), "reason": datasets.Value("string")}
    return datasets.Features(names)


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets

    where = f"dataset '{ctx.spec.locators['name']}' ({ctx.spec.locators['source']})"
    formatting, kind, tags = config["formatting"], config["kind"], config["tags"]
    drop = config["on_invalid_row"] == "drop"
    if (ctx.inputs["rows"] / "source.json").exists():
        return publish_stream(config, ctx, out, where)
    # map() would otherwise write its cache file into the input artifact's folder, damaging it.
    datasets.disable_caching()
    rows = datasets.load_from_disk(str(ctx.inputs["rows"] / "rows"))
    columns = usable_columns(config, rows.column_names, where)

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return {**convert_row(row, formatting, kind, columns, tags), "row": index, "invalid": "", "reason": ""}
        except RowError as exc:
            if not drop:
                raise DataError(f"{where}, row {index}: {exc}") from None
            return {**unified([], []), "row": index, "invalid": f"row {index}: {exc}", "reason": exc.reason}

    aligned = rows.map(
        convert,
        with_indices=True,
        remove_columns=rows.column_names,
        features=features(checked=True),
        num_proc=ctx.runtime.num_workers,
        desc="align",
    )
    invalid = aligned["invalid"]
    reasons = Counter(reason for reason in aligned["reason"] if reason)
    dropped = [message for message in invalid if message]
    if dropped and len(dropped) == len(aligned):
        raise DataError(f"{where}: all {len(aligned)} rows are invalid, e.g. {dropped[0]}")
    if dropped:
        aligned = aligned.select([i for i, message in enumerate(invalid) if not message])
        ctx.log.warning("%s: dropped %d invalid rows of %d: %s", where, len(dropped), len(invalid), dict(reasons))
    aligned = aligned.remove_columns(["invalid", "reason"])
    aligned.save_to_disk(str(out / "rows"))
    ctx.log.info("aligned %d %s rows", len(aligned), kind)
    return {
        "rows": len(aligned),
        "kind": kind,
        "dropped_invalid": len(dropped),
        "drop_reasons": dict(reasons.most_common()),
        "drop_examples": dropped[:EXAMPLES],
    }


def publish_stream(config: dict[str, Any], ctx: BuildContext, out: Path, where: str) -> dict[str, Any]:
    """Streaming: check the first rows now and publish the converter settings that train applies lazily."""
    source = json.loads((ctx.inputs["rows"] / "source.json").read_text())
    present = list(next(iter(open_source(source))))
    part = {"source": source, "formatting": config["formatting"], "kind": config["kind"], "tags": config["tags"],
            "columns": usable_columns(config, present, where), "on_invalid_row": config["on_invalid_row"],
            "where": where, "present_columns": present}
    checked = check_first_rows(part)
    (out / "stream.json").write_text(json.dumps(part))
    ctx.log.info("%s: streaming; checked the first %d rows", where, checked)
    return {"streaming": True, "checked_rows": checked, "kind": config["kind"]}


@task(name="align", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def align_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
