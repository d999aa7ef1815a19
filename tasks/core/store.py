"""The content-addressed artifact store: `<root>/<stage>/<key>/` with `manifest.json` written last.

A stage builds into a temporary sibling directory and publishes it by atomic rename; a directory
without a manifest whose file list still matches is not an artifact and is rebuilt. The manifest
declares what the artifact is (`kind`) and where its parts are (`layout`), so consumers never sniff
files, and carries the artifact's content `digest`, which is what downstream keys hash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict

from tasks.core.digest_cache import source_sha256
from tasks.core.errors import TuneFactoryError
from tasks.core.hashing import file_sha256, stable_hash, tree_files

MANIFEST = "manifest.json"
STAGING = ".staging"
LOCKS = ".locks"
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
KEY_NAME = re.compile(r"[0-9a-f]{64}")  # an artifact folder's name: its key, a sha256


def default_root() -> Path:
    """The store root: $TUNEFACTORY_HOME, else ./artifacts."""
    return Path(os.environ.get("TUNEFACTORY_HOME", "artifacts")).resolve()


class ArtifactRef(BaseModel):
    """What a stage task returns and the next one receives: a pointer into the store, never the data."""

    model_config = ConfigDict(frozen=True)

    stage: str
    key: str
    digest: str  # content digest of the artifact's files: what a downstream key hashes
    kind: str  # what the artifact is: rows, stream, tokenized, base_model, adapter, full_weights, ...

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def short(self) -> str:
        return self.key[:12]


@dataclass(frozen=True)
class Artifact:
    """A published artifact opened for reading: its directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> ArtifactRef:
        # Fresh string objects, through a JSON round trip: Prefect links a task's result to its run by the
        # id() of the result's fields, so a field sharing one string object with a later task's parameters
        # (an input named "model" and this ref's stage "model") would read as a dependency.
        fields = json.loads(json.dumps({name: self.manifest[name] for name in ("stage", "key", "digest", "kind")}))
        return ArtifactRef(**fields)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def info(self) -> dict[str, Any]:
        return self.manifest.get("info", {})

    def has(self, part: str) -> bool:
        return part in self.manifest.get("layout", {})

    def part(self, name: str) -> Path:
        """The file or folder the manifest's layout names `name`."""
        layout = self.manifest.get("layout", {})
        if name not in layout:
            raise KeyError(f"{self.ref.id} ({self.kind}) has no part '{name}'; it has {sorted(layout)}")
        return self.path / layout[name]


def content_digest(files: list[dict[str, Any]], reports: list[str] = ()) -> str:
    """Digest of an artifact's content: every file's relative path and sha256 (not times or locations),
    except report files (training logs with timings), which describe how it was made, not what it is."""
    def is_report(path: str) -> bool:
        return any(path == r or path.startswith(f"{r}/") for r in reports)

    return stable_hash(sorted((f["path"], f["sha256"]) for f in files if not is_report(f["path"])))


class ArtifactStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).resolve() if root else default_root()
        if self.root.exists() and not self.root.is_dir():
            raise TuneFactoryError(f"artifact store {self.root} is a file, not a folder; choose another --home")

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def staging(self, stage: str, key: str) -> Path:
        """A directory that survives a failed build (training checkpoints), keyed like the artifact."""
        path = self.staging_path(stage, key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def staging_path(self, stage: str, key: str) -> Path:
        return self.root / STAGING / stage / key

    def clear_staging(self, stage: str, key: str) -> None:
        """Drop a stage's checkpoints once its artifact is published: they only served a resume."""
        shutil.rmtree(self.staging_path(stage, key), ignore_errors=True)

    def open(self, ref: ArtifactRef) -> Artifact:
        """The published artifact a ref points at (a cheap check: its manifest is there and matches)."""
        directory = self.path(ref.stage, ref.key)
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("key") != ref.key or manifest.get("digest") != ref.digest:
            raise TuneFactoryError(f"artifact {ref.id} is missing or was replaced; run again to rebuild it")
        return Artifact(directory, manifest)

    def lookup(self, stage: str, key: str, full: bool = False) -> Artifact | None:
        """The complete, undamaged artifact for a key, or None.

        A file whose size and modification time match the manifest is taken as written; any other is
        re-hashed, once for its new status (the digest cache: a touched file is not re-read at every lookup).
        `full=True` re-hashes every file (`tunefactory verify`)."""
        directory = self.path(stage, key)
        manifest = read_manifest(directory)
        if manifest is None or manifest.get("key") != key or manifest.get("stage") != stage:
            return None
        listed = {f["path"]: f for f in manifest.get("files", [])}
        present = {str(p.relative_to(directory)) for p in tree_files(directory)} - {MANIFEST}
        if present != set(listed):
            return None
        for rel, entry in listed.items():
            stat = (directory / rel).stat()
            if stat.st_size != entry["size"]:
                return None
            if full and file_sha256(directory / rel) != entry["sha256"]:
                return None
            changed = stat.st_mtime_ns != entry.get("mtime_ns")
            if not full and changed and source_sha256(directory / rel) != entry["sha256"]:
                return None
        return Artifact(directory, manifest)

    def lock(self, stage: str, key: str) -> FileLock:
        """One builder per key; a concurrent run waits, then finds the artifact published."""
        locks = self.root / LOCKS
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{stage}-{key}.lock"))

    @contextmanager
    def reading(self, stage: str, key: str, ids: list[str]) -> Iterator[None]:
        """While the key's build runs (its lock held), a record of the artifacts it reads: gc keeps them."""
        record = self.root / LOCKS / f"{stage}-{key}.reads"
        record.write_text(json.dumps(ids))
        try:
            yield
        finally:
            record.unlink(missing_ok=True)

    def read_by_builds(self, prune: bool = True) -> set[str]:
        """The artifact ids that builds running now read; a record whose key's lock is free was a killed build's
        (removed when `prune`)."""
        ids: set[str] = set()
        for record in (self.root / LOCKS).glob("*.reads"):
            stage, _, key = record.stem.rpartition("-")
            try:
                with self.lock(stage, key).acquire(timeout=0):
                    if prune:
                        record.unlink(missing_ok=True)
            except Timeout:
                try:
                    ids |= set(json.loads(record.read_text()))
                except (FileNotFoundError, ValueError):  # the build just ended
                    pass
        return ids

    @contextmanager
    def building(self, stage: str, key: str) -> Iterator[Path]:
        """A temporary directory to build in (`publish` moves it into place); on error it is discarded.

        The caller holds the key's lock. Temporary folders of builds that were killed (their key's
        lock is free) are removed first."""
        parent = self.root / stage
        parent.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries(stage, own_key=key)
        tmp = parent / f"{TEMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove_stale_temporaries(self, stage: str, own_key: str) -> None:
        for folder in (self.root / stage).glob(f"{TEMP_PREFIX}*"):
            key = folder.name.removeprefix(TEMP_PREFIX).rsplit("-", 1)[0]
            if key == own_key:  # we hold this key's lock: an earlier build of it died
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                with self.lock(stage, key).acquire(timeout=0):
                    shutil.rmtree(folder, ignore_errors=True)
            except Timeout:
                pass  # a live build in another process
        for folder in (self.root / stage).glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, tmp: Path, header: dict[str, Any]) -> Artifact:
        """Write the manifest last, then move the directory into place atomically."""
        files = [
            {
                "path": str(p.relative_to(tmp)),
                "size": p.stat().st_size,
                "mtime_ns": p.stat().st_mtime_ns,
                "sha256": file_sha256(p),
            }
            for p in tree_files(tmp)
        ]
        manifest = {
            **header,
            "files": files,
            "digest": content_digest(files, [header["layout"][part] for part in header.get("reports", [])]),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.path(header["stage"], header["key"])
        if final.exists():  # a damaged earlier copy: move it out of the way, then drop it
            trash = final.with_name(f"{TRASH_PREFIX}{header['key'][:16]}-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, final)
        return Artifact(final, manifest)

    def artifact_folders(self) -> Iterator[Path]:
        """Every <stage>/<key> folder, published or not (not temporaries, trash or the store's own dot folders)."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(self.root.iterdir()):
            if stage_dir.is_dir() and not stage_dir.name.startswith("."):
                yield from (d for d in sorted(stage_dir.iterdir()) if d.is_dir() and not d.name.startswith("."))

    def artifacts(self) -> Iterator[Artifact]:
        """Every published artifact (a cheap check: manifest present), for listings and housekeeping."""
        for directory in self.artifact_folders():
            if (manifest := read_manifest(directory)) is not None:
                yield Artifact(directory, manifest)

    def unpublished(self) -> Iterator[Path]:
        """Artifact folders without a valid manifest: set aside as damaged by verify, or whose manifest was lost
        or torn. Publishing renames a complete folder into place, so none is a build in progress. Only folders named
        as keys are: a folder of the user's in the store (or a --home that is no store) is not an artifact."""
        return (directory for directory in self.artifact_folders()
                if KEY_NAME.fullmatch(directory.name) and read_manifest(directory) is None)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and {"key", "stage", "digest", "kind"} <= set(data) else None
