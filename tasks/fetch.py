"""Fetch stage: one registry entry's raw rows, as an Arrow dataset on disk (or, streaming, how to open them).

Local files are keyed by their bytes, never their names or locations; hub datasets by the commit
their revision resolves to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.digest_cache import source_sha256
from tasks.core.errors import DataError, read_utf8
from tasks.core.hashing import tree_digest
from tasks.core.registry import DatasetEntry
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step
from tasks.rows import save_rows
from tasks.sources import ORIGIN_COLUMNS, load_arguments, located, open_rows, open_source

LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


class HubSource(BaseModel):
    model_config = ConfigDict(frozen=True)

    repo: str
    commit: str
    subset: str | None
    split: str
    folder: str | None


class FetchConfig(StageConfig):
    source: str  # content digest of the source: its file bytes, or the hub repo and commit
    loader: str | None  # the datasets loader for a local source's file type
    files: tuple[str, ...]  # a folder source's files, relative to it (a single file: empty)
    hub: HubSource | None
    num_samples: int | None
    streaming: bool


def local_files(path: Path) -> tuple[str, list[Path]]:
    """The datasets loader name and the files of a local source: a file, or a folder of same-type files."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    kinds = {LOADERS.get(p.suffix.lower()) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{path}: expected files of one type among {sorted(LOADERS)}")
    return kinds.pop(), files


def hub_source(entry: DatasetEntry) -> HubSource:
    """The hub dataset pinned to the commit its revision points at now."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().dataset_info(entry.hf_hub_url, revision=entry.revision)
    except Exception as exc:  # offline, private, or no such repo
        raise DataError(
            f"dataset '{entry.name}': cannot resolve hub dataset {entry.hf_hub_url}"
            f"@{entry.revision or 'main'} ({type(exc).__name__}); use a local file_name"
        ) from None
    return HubSource(repo=entry.hf_hub_url, commit=info.sha, subset=entry.subset, split=entry.split,
                     folder=entry.folder)


def plan(entry: DatasetEntry, streaming: bool) -> Step:
    locators = {"name": entry.name, "path": "", "where": f"dataset '{entry.name}' ({entry.description})"}
    if entry.file_name:
        path = entry.local_path
        if not path.exists():
            raise DataError(f"dataset '{entry.name}': file not found: {path}")
        loader, files = local_files(path)
        digest = tree_digest(path) if path.is_dir() else source_sha256(path)
        relative = tuple(str(f.relative_to(path)) for f in files) if path.is_dir() else ()
        config = FetchConfig(source=digest, loader=loader, files=relative, hub=None,
                             num_samples=entry.num_samples, streaming=streaming)
        locators["path"] = str(path)
    else:
        hub = hub_source(entry)
        config = FetchConfig(source=f"hub:{hub.repo}@{hub.commit}", loader=None, files=(), hub=hub,
                             num_samples=entry.num_samples, streaming=streaming)
    return STAGE.step(f"fetch[{entry.name}]", config, locators=locators)


def check_json_rows(path: Path) -> int:
    """Raise a DataError naming the file and line of the first malformed JSON row; the rows counted."""
    text = read_utf8(path, "a dataset file", DataError)
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        count = 0
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path}, line {number}: malformed JSON row ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {number}: a row must be a JSON object")
                count += 1
        return count
    try:
        rows = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {index}: a row must be a JSON object")
    return len(rows)


def rows_per_file(loader: str | None, files: list[str]) -> list[int] | None:
    """How many rows each of a source's files holds, where that is cheap to know exactly: JSON (read through
    once, checking it) and Parquet (its metadata); None otherwise (CSV, Arrow and text are counted only by
    loading them). JSON files are checked in either case."""
    if loader == "json":
        return [check_json_rows(Path(file)) for file in files]
    if loader == "parquet":
        import pyarrow.parquet as pq

        try:
            return [pq.ParquetFile(file).metadata.num_rows for file in files]
        except Exception:  # load_dataset names an unreadable file
            return None
    return None


def source_description(config: FetchConfig) -> dict[str, Any]:
    """How to open the source, without its location: the location comes from the run's plan."""
    return {"source": config.source, "loader": config.loader, "files": list(config.files),
            "hub": config.hub.model_dump() if config.hub else None, "num_samples": config.num_samples}


def check_rows(step: Step) -> None:
    """Read a local JSON source through once, so a malformed row fails at plan time, naming file and line."""
    if step.config.loader == "json":
        for file in load_arguments(source_description(step.config), step.locators["path"])["data_files"]:
            check_json_rows(Path(file))


NUM_SAMPLES_SEED = 42  # LlamaFactory's default seed, which its sampling draws under


def sample_indexes(available: int, wanted: int) -> list[int]:
    """A registry entry's `num_samples` as LlamaFactory's loader draws them: a random permutation of the
    rows cut to `wanted` (every row once if there are enough), topped up by drawing with replacement when
    `wanted` is more than there are, which is how a registry upsamples a small dataset in a mix. Seeded,
    so the same source gives the same rows (and the same artifact) every time."""
    import numpy as np

    if available == 0:
        return []  # nothing to draw from: the stages after say the dataset is empty
    rng = np.random.default_rng(NUM_SAMPLES_SEED)
    indexes = rng.permutation(available)[:wanted]
    extra = rng.choice(available, wanted - len(indexes)) if wanted > len(indexes) else []
    return [int(i) for i in np.concatenate([indexes, extra])]


def build(config: FetchConfig, ctx: BuildContext, out: Path) -> Built:
    description = source_description(config)
    arguments = load_arguments(description, ctx.locators["path"])
    counts = rows_per_file(config.loader, arguments["data_files"]) if config.loader else None
    where = ctx.locators["where"]
    if config.streaming:
        # Publish how to open the source, not its rows; one row is read to prove it opens.
        first = next(iter(open_source(description, ctx.locators["path"], where)), None)
        if first is None:
            raise DataError(f"{where}: the source has no rows")
        (out / "source.json").write_text(json.dumps(description, indent=1))
        return Built("stream", {"source": "source.json"}, {"columns": [c for c in first if c not in ORIGIN_COLUMNS]})
    rows = located(open_rows(arguments, where), config.files, counts)
    if config.num_samples:
        rows = rows.select(sample_indexes(len(rows), config.num_samples))
    save_rows(rows, out / "rows")
    columns = [name for name in rows.column_names if name not in ORIGIN_COLUMNS]
    ctx.log.info("%s: fetched %d rows with columns %s", where, len(rows), columns)
    return Built("rows", {"rows": "rows"}, {"rows": len(rows), "columns": columns})


STAGE = Stage(
    name="fetch",
    plan=plan,
    build=build,
    code=("tasks.fetch", "tasks.rows", "tasks.sources"),
    libraries=("datasets", "pyarrow"),
)
