"""The dataset registry: LlamaFactory's `dataset_info.json` (or `.yaml`), from `dataset_dir` over the bundled one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.errors import DataError, RecipeError, did_you_mean, read_utf8

BUNDLED_DIR = Path(__file__).resolve().parents[2] / "configs" / "data"
REGISTRY_FILE = "dataset_info.json"
REGISTRY_FILES = ("dataset_info.json", "dataset_info.yaml", "dataset_info.yml")

# Column and tag names per formatting, as LlamaFactory's parser reads them.
COMMON_COLUMNS = ("system", "tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag")
COLUMN_NAMES = {
    "alpaca": ("prompt", "query", "response", "history", *COMMON_COLUMNS),
    "sharegpt": ("messages", *COMMON_COLUMNS),
    "openai": ("messages", *COMMON_COLUMNS),
}
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool"}
DEFAULT_TAGS = {"alpaca": {}, "sharegpt": SHAREGPT_TAGS, "openai": OPENAI_TAGS}
# Sources LlamaFactory knows but this tool cannot fetch: accepted so its registries parse, refused when used.
UNSUPPORTED_SOURCES = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


class DatasetEntry(BaseModel):
    """One registry entry, with LlamaFactory's field names and defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    file_name: str | None = None
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None
    cloud_file_name: str | None = None
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    formatting: Literal["alpaca", "sharegpt", "openai"] = "alpaca"
    ranking: bool = False
    num_samples: int | None = Field(None, gt=0)
    columns: dict[str, str | None] = Field(default_factory=dict)
    tags: dict[str, str | None] = Field(default_factory=dict)
    base_dir: str = Field("", exclude=True)  # where file_name is resolved; not part of any key
    registry_file: str = Field("", exclude=True)  # the file that declared the entry, for messages

    @property
    def local_path(self) -> Path | None:
        return Path(self.base_dir) / self.file_name if self.file_name else None

    @property
    def description(self) -> str:
        return str(self.local_path) if self.file_name else f"hub:{self.hf_hub_url}"

    def column_map(self) -> dict[str, str | None]:
        """Every column field of the formatting -> dataset column (None: unused), with LlamaFactory's defaults."""
        # As in LlamaFactory, a `columns` block replaces the defaults: {"prompt": "text"} is a pretraining set.
        given = self.columns or DEFAULT_COLUMNS[self.formatting]
        mapped = {field: given.get(field) for field in COLUMN_NAMES[self.formatting]}
        if self.ranking:  # the README's preference examples name them so; saves a columns block
            mapped["chosen"] = mapped["chosen"] or "chosen"
            mapped["rejected"] = mapped["rejected"] or "rejected"
        return mapped

    def defaulted_columns(self) -> list[str]:
        """Column fields filled by a default rather than named by the user (may be absent from the data)."""
        return sorted(f for f, c in self.column_map().items() if c and not self.columns.get(f))

    def tag_map(self) -> dict[str, str | None]:
        """Message tags for sharegpt/openai rows: the user's tags over the formatting's defaults."""
        return {**DEFAULT_TAGS[self.formatting], **self.tags} if self.formatting != "alpaca" else {}


def entry_problem(entry: DatasetEntry) -> tuple[str, str] | None:
    """The first (field, problem) of an entry that parsed but cannot be used, or None."""
    known = COLUMN_NAMES[entry.formatting]
    for key in entry.columns:
        if key not in known:
            hint = did_you_mean(key, known)
            return f"columns.{key}", f"not a {entry.formatting} column{hint} (known: {', '.join(known)})"
    if entry.tags and entry.formatting == "alpaca":
        return "tags", "tags apply to the sharegpt and openai formattings only; set 'formatting' or remove 'tags'"
    for key in entry.tags:
        if key not in SHAREGPT_TAGS:
            hint = did_you_mean(key, SHAREGPT_TAGS)
            return f"tags.{key}", f"not a tag{hint} (known: {', '.join(SHAREGPT_TAGS)})"
    columns = entry.column_map()
    main = "prompt" if entry.formatting == "alpaca" else "messages"
    if not columns[main]:
        return f"columns.{main}", f"required for the {entry.formatting} formatting"
    if entry.ranking and columns["kto_tag"]:
        return "ranking", "a dataset is either a preference set (ranking) or a KTO set (columns.kto_tag), not both"
    if not any(getattr(entry, f) for f in ("file_name", "hf_hub_url", *UNSUPPORTED_SOURCES)):
        return "file_name", "an entry needs 'file_name' or 'hf_hub_url'"
    return None


def _read_file(path: Path) -> dict[str, Any]:
    """The raw mapping of one registry file (JSON or YAML)."""
    text = read_utf8(path, "the dataset registry", DataError)
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise DataError(f"{path}: not valid {kind}: {exc}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a dataset registry is a mapping of dataset names to entries")
    return raw


def parse_entry(name: str, fields: Any, path: Path) -> DatasetEntry:
    """One validated entry; a problem is a DataError naming the file, the dataset and the field."""
    if not isinstance(fields, dict):
        raise DataError(f"{path}: dataset '{name}': an entry is a mapping of fields (file_name, columns, ...)")
    try:
        entry = DatasetEntry(name=name, base_dir=str(path.parent), registry_file=str(path), **fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"]))
        hint = did_you_mean(field, DatasetEntry.model_fields) if err["type"] == "extra_forbidden" else ""
        raise DataError(f"{path}: dataset '{name}', field '{field}': {err['msg']}{hint}") from None
    problem = entry_problem(entry)
    if problem:
        raise DataError(f"{path}: dataset '{name}', field '{problem[0]}': {problem[1]}")
    return entry


def registry_paths(directory: Path) -> list[Path]:
    """The registry files present in a directory (JSON and YAML may sit side by side)."""
    return [directory / name for name in REGISTRY_FILES if (directory / name).is_file()]


def _read_registry(directory: Path) -> dict[str, DatasetEntry]:
    entries: dict[str, DatasetEntry] = {}
    for path in registry_paths(directory):
        for name, fields in _read_file(path).items():
            if name in entries:
                raise DataError(f"{path}: dataset '{name}' is also declared in {entries[name].registry_file}")
            entries[name] = parse_entry(str(name), fields, path)
    return entries


def load_registry(dataset_dir: str | Path) -> dict[str, DatasetEntry]:
    """Entries of `<dataset_dir>/dataset_info.{json,yaml}`, over the bundled entries of the same name."""
    return {**_read_registry(BUNDLED_DIR), **_read_registry(Path(dataset_dir).resolve())}


def check_source(entry: DatasetEntry) -> None:
    """Refuse an entry whose only source is one this tool cannot fetch (ModelScope, scripts, cloud)."""
    if entry.file_name or entry.hf_hub_url:
        return
    field = next(f for f in UNSUPPORTED_SOURCES if getattr(entry, f))
    raise DataError(
        f"{entry.registry_file}: dataset '{entry.name}', field '{field}': this source is not supported; "
        "set 'hf_hub_url' or 'file_name'"
    )


def check_confined(entry: DatasetEntry) -> None:
    """A file_name must stay inside the folder of the registry that declares it, after resolving `..` and
    symlinks: recipes arrive from UIs and deployments, and must not read (or hash) arbitrary files."""
    if not entry.file_name:
        return
    base = Path(entry.base_dir).resolve()
    if not entry.local_path.resolve().is_relative_to(base):
        raise DataError(
            f"{entry.registry_file}: dataset '{entry.name}', field 'file_name': {entry.file_name} resolves to "
            f"{entry.local_path.resolve()}, outside {base}; move the data there or set "
            "allow_outside_dataset_dir: true in the recipe"
        )


def resolve_datasets(
    names: str | None, dataset_dir: str | Path, key: str, allow_outside: bool = False
) -> list[DatasetEntry]:
    """Registry entries for a comma-separated recipe value; unknown names are a recipe error."""
    if not names:
        return []
    registry = load_registry(dataset_dir)
    entries = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none"
            files = registry_paths(Path(dataset_dir)) or [Path(dataset_dir) / REGISTRY_FILE]
            raise RecipeError(
                f"key '{key}': dataset '{name}' is not in {' or '.join(map(str, files))} "
                f"or the bundled registry{did_you_mean(name, registry) or f' (known: {known})'}"
            )
        check_source(registry[name])
        if not allow_outside:
            check_confined(registry[name])
        entries.append(registry[name])
    return entries
