"""Opening a dataset source with `datasets`: the same arguments serve fetch (materialized) and streaming.

A source description (what fetch publishes for streaming) says how to open a source but not where
it is: its location comes from the current run's plan, so a moved file is found where it is now.
Rows come with their origin (ORIGIN_COLUMNS: the file within a folder source and the row within that
file), so an error after sampling, mixing or a folder's files joined still names the row in its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.errors import DataError


def load_arguments(source: dict[str, Any], location: str) -> dict[str, Any]:
    """datasets.load_dataset arguments for a described source: local files at `location`, or a hub commit."""
    hub = source["hub"]
    if hub:
        return {"path": hub["repo"], "name": hub["subset"], "data_dir": hub["folder"], "split": hub["split"],
                "revision": hub["commit"]}
    root = Path(location)
    files = [str(root / name) for name in source["files"]] if source["files"] else [str(root)]
    arguments: dict[str, Any] = {"path": source["loader"], "data_files": files, "split": "train"}
    if source["loader"] == "csv":  # an empty CSV cell is an empty text, not NaN
        arguments["keep_default_na"] = False
    return arguments


# A row's file in a folder source ("" for a one-file source) and its row in that file.
SOURCE_FILE, SOURCE_ROW = "__source_file", "__source_row"
ORIGIN_COLUMNS = (SOURCE_FILE, SOURCE_ROW)


def file_arguments(arguments: dict[str, Any], file: str) -> dict[str, Any]:
    """load_dataset arguments for one of a local source's files."""
    one = {**arguments, "data_files": [file]}
    if arguments["path"] == "csv":
        one["features"] = csv_text_features(file)
    return one


def csv_text_features(path: str):
    """Every column of a CSV file read as text: left to infer, pandas reads a column of "007", "2.50" and
    "3" as numbers, and the text it trains on would be 7.0, 2.5 and 3.0. Column names from the header."""
    import csv

    import datasets

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError):
        return None  # load_dataset reports the file itself
    if not header or len(set(header)) != len(header):
        return None
    return datasets.Features({name: datasets.Value("string") for name in header})


def open_rows(arguments: dict[str, Any], where: str, streaming: bool = False):
    """load_dataset with a DataError naming the dataset if the source cannot be read."""
    import datasets

    try:
        return datasets.load_dataset(**arguments, streaming=streaming)
    except (ImportError, AttributeError):  # the libraries failing, not the file: not the dataset's fault
        raise
    except Exception as exc:
        raise DataError(f"{where}: cannot read {arguments['path']}: {exc}".splitlines()[0]) from None


def open_located_rows(source: dict[str, Any], location: str, where: str, streaming: bool = False):
    """A source's rows with their ORIGIN_COLUMNS: each file is opened on its own (in the folder's order) so that
    a row's number is its row in its file."""
    import datasets

    arguments = load_arguments(source, location)
    files = arguments.get("data_files") or [None]  # a hub source: one split
    names = source["files"] or [""]
    parts = []
    for file, name in zip(files, names, strict=True):
        rows = open_rows(file_arguments(arguments, file) if file else arguments, where, streaming)
        if streaming:
            rows = rows.map(lambda _, index, name=name: {SOURCE_FILE: name, SOURCE_ROW: index}, with_indices=True)
        else:
            rows = rows.add_column(SOURCE_FILE, [name] * len(rows)).add_column(SOURCE_ROW, list(range(len(rows))))
        parts.append(rows)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def open_source(source: dict[str, Any], location: str, where: str):
    """The raw rows of a described source, with their origin, as an IterableDataset (num_samples applied)."""
    rows = open_located_rows(source, location, where, streaming=True)
    return rows.take(source["num_samples"]) if source.get("num_samples") else rows


def row_origin(row: dict[str, Any]) -> str:
    """Where a row is in its source: "row 5", or "file part2.jsonl, row 1" in a folder source."""
    file = row.get(SOURCE_FILE)
    return f"file {file}, row {row[SOURCE_ROW]}" if file else f"row {row[SOURCE_ROW]}"
