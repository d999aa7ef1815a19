"""Arrow row datasets as artifact parts: saved so that equal rows give equal bytes."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core.hashing import file_sha256, stable_hash


def save_rows(rows, directory: Path) -> None:
    """`save_to_disk`, with state.json's fingerprint derived from the saved data.

    datasets records a random fingerprint when its cache is off (as it is in every stage, so that
    map() never writes into an input artifact); a content fingerprint keeps the artifact's digest,
    and so every downstream key, the same when a rebuild produces the same rows."""
    rows.save_to_disk(str(directory))
    state_file = directory / "state.json"
    state = json.loads(state_file.read_text())
    data = [file_sha256(directory / entry["filename"]) for entry in state["_data_files"]]
    state["_fingerprint"] = stable_hash(data)[:16]
    state_file.write_text(json.dumps(state, indent=2, sort_keys=True))


def load_rows(directory: Path):
    """A saved row dataset, memory-mapped."""
    import datasets

    return datasets.load_from_disk(str(directory))
