"""The content-addressed artifact store: `<root>/<stage>/<key>/` with `manifest.json` written last.

A stage builds into a temporary sibling directory and publishes it by atomic rename; a directory
without a manifest whose file list still matches byte for byte is not an artifact and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import BaseModel

from tasks.core.hashing import file_sha256, tree_files

MANIFEST = "manifest.json"


def default_root() -> Path:
    """The store root: $TUNEFACTORY_HOME, else ./artifacts."""
    return Path(os.environ.get("TUNEFACTORY_HOME", "artifacts")).resolve()


class StageSpec(BaseModel):
    """Everything that decides a stage's output, and the key that names it."""

    stage: str
    label: str  # how this invocation is shown: "fetch[pydoc_summaries]", "evaluate[tuned]"
    key: str
    config: dict[str, Any]
    inputs: dict[str, str]  # input name -> "<stage>/<key>"
    code: str
    versions: dict[str, str]
    # Where to find sources (file paths, display names). Their content is keyed through `config`;
    # their location is not, so moving a dataset file does not invalidate anything.
    locators: dict[str, str] = {}

    @property
    def short(self) -> str:
        return self.key[:12]


class ArtifactRef(BaseModel):
    """What a Prefect task returns: a pointer into the store, never the data itself."""

    stage: str
    key: str

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"


@dataclass
class Manifest:
    data: dict[str, Any]

    @property
    def mlflow_run_id(self) -> str | None:
        return self.data.get("mlflow_run_id")


class ArtifactStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root else default_root()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def staging(self, spec: StageSpec) -> Path:
        """A directory that survives a failed build (training checkpoints), keyed like the artifact."""
        path = self.staging_path(spec)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_path(self, spec: StageSpec) -> Path:
        return self.root / ".staging" / spec.stage / spec.key

    def clear_staging(self, spec: StageSpec) -> None:
        """Drop a stage's checkpoints once its artifact is published: they only served a resume."""
        shutil.rmtree(self.staging_path(spec), ignore_errors=True)

    def resolve(self, ref: ArtifactRef | str) -> Path:
        stage, key = (ref.stage, ref.key) if isinstance(ref, ArtifactRef) else ref.split("/", 1)
        return self.path(stage, key)

    def lookup(self, stage: str, key: str, verify: bool = True) -> Manifest | None:
        """The manifest of a complete, undamaged artifact, or None."""
        directory = self.path(stage, key)
        try:
            data = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if data.get("key") != key or data.get("stage") != stage:
            return None
        listed = {f["path"]: f for f in data.get("files", [])}
        present = {str(p.relative_to(directory)) for p in tree_files(directory)} - {MANIFEST}
        if present != set(listed):
            return None
        for rel, entry in listed.items():
            file = directory / rel
            if file.stat().st_size != entry["size"] or (verify and file_sha256(file) != entry["sha256"]):
                return None
        return Manifest(data)

    def lock(self, stage: str, key: str) -> FileLock:
        """One builder per key; a concurrent run waits, then finds the artifact published."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{stage}-{key}.lock"))

    @contextmanager
    def building(self, spec: StageSpec) -> Iterator[Path]:
        """Yield a temporary directory to build in (`publish` moves it into place); on error, discard it."""
        parent = self.root / spec.stage
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{spec.key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, spec: StageSpec, tmp: Path, extra: dict[str, Any]) -> Manifest:
        """Write the manifest last, then move the directory into place atomically."""
        files = [
            {"path": str(p.relative_to(tmp)), "size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in tree_files(tmp)
        ]
        manifest = {
            "key": spec.key,
            "stage": spec.stage,
            "label": spec.label,
            "config": spec.config,
            "inputs": spec.inputs,
            "code": spec.code,
            "versions": spec.versions,
            "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.path(spec.stage, spec.key)
        if final.exists():  # a damaged earlier copy: move it out of the way, then drop it
            trash = final.with_name(f".trash-{spec.key[:16]}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        return Manifest(manifest)
