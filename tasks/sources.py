"""Opening a dataset source with `datasets`: the same arguments serve fetch (materialized) and streaming.

A source description (what fetch publishes for streaming) says how to open a source but not where
it is: its location comes from the current run's plan, so a moved file is found where it is now.
Rows come with their origin (ORIGIN_COLUMNS: the file within a folder source and the row within that
file), so an error after sampling or mixing still names the row in its file. A folder's files are opened
in one load (as datasets joins them); each row's file is known where fetch can count every file's rows
cheaply (JSON, Parquet), else its number counts across the files in name order.
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
        arguments["features"] = csv_text_features(files[0])
    return arguments


# A row's file in a folder source ("" for a one-file source, JOINED where unknown) and its row in that file
# (where unknown, in the folder's files taken in name order).
SOURCE_FILE, SOURCE_ROW = "__source_file", "__source_row"
ORIGIN_COLUMNS = (SOURCE_FILE, SOURCE_ROW)
JOINED = "*"


def located(rows, names: tuple[str, ...], counts: list[int] | None):
    """Materialized rows with their ORIGIN_COLUMNS, given a folder's file names and how many rows each holds
    (None, or counts that do not add up to the rows: not known)."""
    total = len(rows)
    if len(names) > 1 and counts is not None and sum(counts) == total:
        files = [name for name, count in zip(names, counts, strict=True) for _ in range(count)]
        numbers = [number for count in counts for number in range(count)]
    else:
        files, numbers = [JOINED if len(names) > 1 else ""] * total, list(range(total))
    return rows.add_column(SOURCE_FILE, files).add_column(SOURCE_ROW, numbers)


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


def open_source(source: dict[str, Any], location: str, where: str):
    """The raw rows of a described source, with their origin, as an IterableDataset (num_samples applied: the
    first rows)."""
    rows = open_rows(load_arguments(source, location), where, streaming=True)
    file = JOINED if len(source["files"]) > 1 else ""  # a stream's files are not counted up front
    rows = rows.map(lambda _, index: {SOURCE_FILE: file, SOURCE_ROW: index}, with_indices=True)
    return rows.take(source["num_samples"]) if source.get("num_samples") else rows


def origin_text(file: str | None, number: int) -> str:
    """Where a row is in its source: "row 5", "file part2.jsonl, row 1" in a folder source, or "row 7 of the
    folder's files in name order" where its file is not known."""
    if file == JOINED:
        return f"row {number} of the folder's files in name order"
    return f"file {file}, row {number}" if file else f"row {number}"


def row_origin(row: dict[str, Any]) -> str:
    """origin_text of a raw row (its ORIGIN_COLUMNS)."""
    return origin_text(row.get(SOURCE_FILE), row[SOURCE_ROW])
