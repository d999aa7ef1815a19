"""Align stage: a fetched dataset's rows in the unified schema.

Unified row: `messages` (alternating user/assistant turns, ending with assistant), `system`,
`tools`, and `row` (the source row index, so later errors can point back at the file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.errors import DataError
from tasks.core.registry import DatasetEntry
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec

STAGE = "align"
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}


class RowError(ValueError):
    """A row that cannot be aligned; the message names the field."""


def plan(entry: DatasetEntry, fetched: StageSpec) -> StageSpec:
    config = {"formatting": entry.formatting, "columns": entry.columns, "tags": entry.tags, "ranking": entry.ranking}
    locators = {"name": entry.name, "source": entry.description}
    return make_spec(STAGE, f"align[{entry.name}]", config, {"rows": fetched}, ["tasks.align"], ("datasets",), locators)


def text(row: dict[str, Any], column: str | None, field: str, required: bool) -> str:
    """A string cell; a missing or empty required cell is a RowError naming the field."""
    value = row.get(column) if column else None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RowError(f"field '{column}' ({field}) is empty")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{column}' ({field}) must be a string, got {type(value).__name__}")
    return value


def align_alpaca(row: dict[str, Any], columns: dict[str, str | None], _tags: dict[str, str]) -> dict[str, Any]:
    prompt = text(row, columns["prompt"], "prompt", required=True)
    query = text(row, columns["query"], "query", required=False)
    messages = []
    for turn in (row.get(columns["history"]) if columns["history"] else None) or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
            raise RowError(f"field '{columns['history']}' must hold [user, assistant] pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    messages.append({"role": "assistant", "content": text(row, columns["response"], "response", required=True)})
    return {"messages": messages, "system": text(row, columns["system"], "system", required=False), "tools": ""}


def align_sharegpt(row: dict[str, Any], columns: dict[str, str | None], tags: dict[str, str]) -> dict[str, Any]:
    turns = row.get(columns["messages"])
    if not isinstance(turns, list) or not turns:
        raise RowError(f"field '{columns['messages']}' must be a non-empty list of turns")
    roles = {
        tags["user_tag"]: "user",
        tags["observation_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["function_tag"]: "assistant",
    }
    system = text(row, columns["system"], "system", required=False)
    if turns[0].get(tags["role_tag"]) == tags["system_tag"]:
        system, turns = turns[0].get(tags["content_tag"]) or "", turns[1:]
    messages = []
    for index, turn in enumerate(turns):
        role = roles.get(turn.get(tags["role_tag"]))
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise RowError(
                f"turn {index} of '{columns['messages']}' has role {turn.get(tags['role_tag'])!r}, "
                f"expected a {expected} turn"
            )
        content = turn.get(tags["content_tag"])
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"turn {index} of '{columns['messages']}' has empty '{tags['content_tag']}'")
        messages.append({"role": role, "content": content})
    if len(messages) % 2:
        raise RowError(f"'{columns['messages']}' ends with a user turn; it needs an assistant reply")
    return {"messages": messages, "system": system, "tools": text(row, columns["tools"], "tools", required=False)}


FORMATS: dict[str, tuple[Callable[..., dict[str, Any]], dict[str, Any]]] = {
    "alpaca": (align_alpaca, ALPACA_COLUMNS),
    "sharegpt": (align_sharegpt, SHAREGPT_COLUMNS),
}


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    import datasets

    if config["ranking"]:
        raise DataError(
            f"dataset '{ctx.spec.locators['name']}': preference (ranking) data needs a "
            "preference stage (dpo/rm), which this version does not run"
        )
    align_row, default_columns = FORMATS[config["formatting"]]
    columns = {**default_columns, **config["columns"]}
    tags = {**SHAREGPT_TAGS, **config["tags"]}
    # map() would otherwise write its cache file into the input artifact's folder, damaging it.
    datasets.disable_caching()
    rows = datasets.load_from_disk(str(ctx.inputs["rows"] / "rows"))
    where = f"dataset '{ctx.spec.locators['name']}' ({ctx.spec.locators['source']})"
    for field, column in columns.items():
        if column and column not in rows.column_names and field in ("prompt", "response", "messages"):
            raise DataError(
                f"{where}: column '{column}' (the '{field}' field) not found; "
                f"columns present: {rows.column_names}; set 'columns' in dataset_info.json"
            )

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return {**align_row(row, columns, tags), "row": index}
        except RowError as exc:
            raise DataError(f"{where}, row {index}: {exc}") from None

    aligned = rows.map(
        convert, with_indices=True, remove_columns=rows.column_names, num_proc=ctx.runtime.num_workers, desc="align"
    )
    aligned.save_to_disk(str(out / "rows"))
    ctx.log.info("aligned %d rows", len(aligned))
    return {"rows": len(aligned)}


@task(name="align", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def align_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
