"""Content digests: canonical JSON, file bytes, and a stage's own source code."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of obj (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_files(root: Path) -> list[Path]:
    """Every regular file under root (or root itself if it is a file), in a stable order."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def tree_digest(root: Path) -> str:
    """Digest of a source file or directory: relative paths and bytes of every file inside (read again only
    for files whose status changed, see tasks.core.digest_cache)."""
    from tasks.core.digest_cache import source_sha256

    return stable_hash(
        {str(p.relative_to(root) if root.is_dir() else p.name): source_sha256(p) for p in tree_files(root)}
    )


def module_sources(module_names: Iterable[str]) -> list[Path]:
    """Source files of the named modules; a package contributes every .py file in it. Found, not imported: a
    stage's build-side modules import torch, which planning does without."""
    files: list[Path] = []
    for name in module_names:
        origin = Path(importlib.util.find_spec(name).origin)
        if origin.name == "__init__.py":
            files.extend(sorted(origin.parent.rglob("*.py")))
        else:
            files.append(origin)
    return files


def code_digest(module_names: Iterable[str]) -> str:
    """Digest of the source of the given modules, so a code change changes the artifact key."""
    return stable_hash({p.name + ":" + str(i): file_sha256(p) for i, p in enumerate(module_sources(module_names))})


def library_versions(distributions: Iterable[str]) -> dict[str, str]:
    """Installed versions of the distributions that shape a stage's output."""
    versions = {}
    for name in distributions:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
