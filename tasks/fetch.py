"""Fetch stage: one registry entry's raw rows, as an Arrow dataset on disk.

Local files are keyed by their bytes; hub datasets by the commit their revision resolves to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from tasks.core.errors import DataError
from tasks.core.hashing import tree_digest
from tasks.core.registry import DatasetEntry
from tasks.core.stage import BuildContext, Runtime, artifact_cache_key, execute, make_spec
from tasks.core.store import ArtifactRef, StageSpec

STAGE = "fetch"
LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


def source_digest(entry: DatasetEntry) -> str:
    """Content identity of the source: file bytes, or the hub commit the revision points at."""
    if entry.file_name:
        path = entry.local_path
        if not path.exists():
            raise DataError(f"dataset '{entry.name}': file not found: {path}")
        return tree_digest(path)
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(entry.hf_hub_url, revision=entry.revision)
    except Exception as exc:  # offline, private, or no such repo
        raise DataError(
            f"dataset '{entry.name}': cannot resolve hub dataset {entry.hf_hub_url}"
            f"@{entry.revision or 'main'} ({type(exc).__name__}); use a local file_name"
        ) from None
    return f"hub:{info.sha}"


def plan(entry: DatasetEntry, recipe) -> StageSpec:
    config = {"entry": entry.keyed(), "source": source_digest(entry), **recipe.slice_for(STAGE)}
    locators = {"path": str(entry.local_path) if entry.file_name else "", "name": entry.name}
    return make_spec(STAGE, f"fetch[{entry.name}]", config, {}, ["tasks.fetch"], ("datasets", "pyarrow"), locators)


def check_json_rows(path: Path) -> None:
    """Raise a DataError naming the file and line of the first malformed JSON row."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}, line {number}: malformed JSON row ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: a row must be a JSON object")
        return
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {index}: a row must be a JSON object")


def data_files(path: Path) -> tuple[str, list[str]]:
    """The datasets loader name and file list for a file or a folder of same-format files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    kinds = {LOADERS.get(p.suffix.lower()) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{path}: expected files of one type among {sorted(LOADERS)}")
    return kinds.pop(), [str(p) for p in files]


def load_arguments(entry: dict[str, Any], source: str, where: dict[str, str]) -> dict[str, Any]:
    """The datasets.load_dataset arguments that open this source (a local file/folder or a hub commit)."""
    if where["path"]:
        loader, files = data_files(Path(where["path"]))
        arguments = {"path": loader, "data_files": files, "split": "train"}
        if loader == "csv":  # an empty CSV cell is an empty text, not NaN
            arguments["keep_default_na"] = False
        return arguments
    return {"path": entry["hf_hub_url"], "name": entry["subset"], "data_dir": entry["folder"],
            "split": entry["split"], "revision": source.removeprefix("hub:")}


def open_rows(arguments: dict[str, Any], name: str, streaming: bool = False):
    """load_dataset with a DataError naming the dataset if the source cannot be read."""
    import datasets

    if arguments["path"] == "json":
        for file in arguments["data_files"]:
            check_json_rows(Path(file))
    try:
        return datasets.load_dataset(**arguments, streaming=streaming)
    except Exception as exc:
        raise DataError(f"dataset '{name}': cannot read {arguments['path']}: {exc}".splitlines()[0]) from None


def build(config: dict[str, Any], ctx: BuildContext, out: Path) -> dict[str, Any]:
    entry, where = config["entry"], ctx.spec.locators
    arguments = load_arguments(entry, config["source"], where)
    if config["streaming"]:
        # Streaming: publish how to open the source, not its rows; one row is read to prove it opens.
        stream = open_rows(arguments, where["name"], streaming=True)
        first = next(iter(stream), None)
        if first is None:
            raise DataError(f"dataset '{where['name']}': the source has no rows")
        (out / "source.json").write_text(json.dumps({"load": arguments, "num_samples": entry["num_samples"]}))
        return {"streaming": True, "columns": list(first)}
    rows = open_rows(arguments, where["name"])
    if entry["num_samples"]:
        rows = rows.select(range(min(entry["num_samples"], len(rows))))
    rows.save_to_disk(str(out / "rows"))
    ctx.log.info("fetched %d rows with columns %s", len(rows), rows.column_names)
    return {"rows": len(rows), "columns": rows.column_names}


@task(name="fetch", cache_key_fn=artifact_cache_key, persist_result=True, result_serializer="json")
def fetch_task(spec: StageSpec, runtime: Runtime) -> ArtifactRef:
    return execute(spec, build, runtime)
