"""Copying results into folders the user names (output_dir, export_dir) without ever losing their files.

TuneFactory records what it writes into such a folder in `tunefactory.json` (before copying, every name
the copy may leave, marked incomplete; after, the files written). A later run replaces and removes only
files listed there; any other file is the user's and is never touched, whatever the flags.
`overwrite_output_dir: true` only allows writing into a folder of the user's files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.core.errors import RecipeError
from tasks.core.hashing import tree_files

MARKER = "tunefactory.json"


def written_before(target: Path) -> set[str] | None:
    """Files TuneFactory wrote into target on an earlier run (relative paths); None if a file named like
    our record is there but is not one (then it is the user's, like any other)."""
    marker = target / MARKER
    if not marker.exists():
        return set()
    try:
        record = json.loads(marker.read_text())
        return {str(name) for name in record["files"]} if isinstance(record, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ours(target: Path) -> set[str]:
    """Relative paths TuneFactory may replace or remove in target: its recorded files and its record."""
    recorded = written_before(target)
    return set() if recorded is None else recorded | {MARKER}


def users_files(target: Path) -> list[str]:
    owned = ours(target)
    return sorted(name for p in tree_files(target) if (name := str(p.relative_to(target))) not in owned)


def check_target(key: str, target: Path, overwrite: bool) -> None:
    """Refuse, at plan time, a target that is not a folder, or a folder of the user's files (one TuneFactory never
    wrote into) without overwrite. Files a user adds to a folder TuneFactory wrote are kept, not refused."""
    if target.is_symlink() and not target.exists():
        raise RecipeError(f"key '{key}': {target} is a symlink to nothing; remove it or choose another folder")
    if target.exists() and not target.is_dir():
        raise RecipeError(f"key '{key}': {target} is a file, not a folder")
    if target.is_dir() and not overwrite and not written_before(target):
        foreign = users_files(target)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RecipeError(f"key '{key}': {target} holds files TuneFactory did not write ({shown}); choose an "
                              "empty folder, or set overwrite_output_dir: true to write beside them")


def write_into(source: Path, target: Path, artifact_id: str, key: str) -> list[str]:
    """Copy source's files into target: replace our earlier files, drop those of ours no longer produced,
    never touch the user's. A file of the user's with the name of one of ours is an error."""
    owned = ours(target)
    previous = owned - {MARKER}
    new = [str(p.relative_to(source)) for p in tree_files(source)]
    clashes = [name for name in [*new, MARKER] if (target / name).exists() and name not in owned]
    if clashes:
        raise RecipeError(f"key '{key}': {target} already holds {', '.join(clashes[:3])}, which TuneFactory "
                          "did not write; move it away or choose another folder")
    target.mkdir(parents=True, exist_ok=True)
    # Claim every name this copy may leave before writing any: a copy cut short (Ctrl-C, a kill) leaves files the
    # record calls ours, so the next run replaces them, rather than refusing them as the user's.
    claimed = previous | set(new) | {partial_name(name) for name in new}
    record(target, {"artifact": artifact_id, "files": sorted(claimed), "complete": False})
    for name in new:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = target / partial_name(name)
        shutil.copyfile(source / name, partial)
        os.replace(partial, destination)
    for name in claimed - set(new):
        (target / name).unlink(missing_ok=True)
    record(target, {"artifact": artifact_id, "files": sorted(new), "complete": True})
    return new


def partial_name(name: str) -> str:
    """Where a file is copied before it is moved into place under its name."""
    path = Path(name)
    return str(path.with_name(f".{path.name}.tunefactory-partial"))


def record(target: Path, content: dict) -> None:
    """Write the record whole or not at all."""
    partial = target / partial_name(MARKER)
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, target / MARKER)
