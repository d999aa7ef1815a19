"""The dataset registry: LlamaFactory's `dataset_info.json`, from `dataset_dir` over the bundled one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.errors import DataError, RecipeError

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"
REGISTRY_FILE = "dataset_info.json"


class DatasetEntry(BaseModel):
    """One registry entry, with LlamaFactory's field names and defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    ranking: bool = False
    num_samples: int | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    base_dir: str = Field("", exclude=True)  # where file_name is resolved; not part of any key

    @property
    def local_path(self) -> Path | None:
        return Path(self.base_dir) / self.file_name if self.file_name else None

    @property
    def description(self) -> str:
        return str(self.local_path) if self.file_name else f"hub:{self.hf_hub_url}"

    def keyed(self) -> dict[str, Any]:
        """The entry's fields that shape fetched/aligned rows (the file location is keyed by content)."""
        return self.model_dump(exclude={"base_dir", "name"})


def _read_registry(directory: Path) -> dict[str, DatasetEntry]:
    path = directory / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON: {exc}") from None
    entries = {}
    for name, fields in raw.items():
        try:
            entries[name] = DatasetEntry(name=name, base_dir=str(directory), **fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise DataError(
                f"{path}: dataset '{name}', field '{'.'.join(map(str, err['loc']))}': {err['msg']}"
            ) from None
        if not (entries[name].file_name or entries[name].hf_hub_url):
            raise DataError(f"{path}: dataset '{name}' needs 'file_name' or 'hf_hub_url'")
    return entries


def load_registry(dataset_dir: str | Path) -> dict[str, DatasetEntry]:
    """Entries of `<dataset_dir>/dataset_info.json`, over the bundled entries of the same name."""
    return {**_read_registry(BUNDLED_DIR), **_read_registry(Path(dataset_dir).resolve())}


def resolve_datasets(names: str | None, dataset_dir: str | Path, key: str) -> list[DatasetEntry]:
    """Registry entries for a comma-separated recipe value; unknown names are a recipe error."""
    if not names:
        return []
    registry = load_registry(dataset_dir)
    entries = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            raise RecipeError(
                f"key '{key}': dataset '{name}' is not in {Path(dataset_dir) / REGISTRY_FILE} "
                f"or the bundled registry (known: {known})"
            )
        entries.append(registry[name])
    return entries
