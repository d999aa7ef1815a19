"""Copying results into folders the user names (output_dir, export_dir) without ever losing their files.

TuneFactory records what it writes into such a folder in `tunefactory.json`. A later run replaces
and removes only files listed there; any other file is the user's and is never touched, whatever
the flags. `overwrite_output_dir: true` only allows writing beside such files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.core.errors import RecipeError
from tasks.core.hashing import tree_files

MARKER = "tunefactory.json"


def written_before(target: Path) -> set[str]:
    """Files TuneFactory wrote into target on an earlier run (relative paths)."""
    try:
        record = json.loads((target / MARKER).read_text())
        return set(record.get("files", []))
    except (OSError, ValueError, AttributeError):
        return set()


def users_files(target: Path) -> list[str]:
    ours = written_before(target) | {MARKER}
    return sorted(str(p.relative_to(target)) for p in tree_files(target) if str(p.relative_to(target)) not in ours)


def check_target(key: str, target: Path, overwrite: bool) -> None:
    """Refuse, at plan time, a target that is not a folder, or a folder of the user's files without overwrite."""
    if target.is_symlink() and not target.exists():
        raise RecipeError(f"key '{key}': {target} is a symlink to nothing; remove it or choose another folder")
    if target.exists() and not target.is_dir():
        raise RecipeError(f"key '{key}': {target} is a file, not a folder")
    if target.is_dir() and not overwrite:
        foreign = users_files(target)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RecipeError(f"key '{key}': {target} holds files TuneFactory did not write ({shown}); choose an "
                              "empty folder, or set overwrite_output_dir: true to write beside them")


def write_into(source: Path, target: Path, artifact_id: str, key: str) -> list[str]:
    """Copy source's files into target: replace our earlier files, drop those of ours no longer produced,
    never touch the user's. A file of the user's with the name of one of ours is an error."""
    previous = written_before(target)
    new = [str(p.relative_to(source)) for p in tree_files(source)]
    clashes = [name for name in new if (target / name).exists() and name not in previous]
    if clashes:
        raise RecipeError(f"key '{key}': {target} already holds {', '.join(clashes[:3])}, which TuneFactory "
                          "did not write; move it away or choose another folder")
    target.mkdir(parents=True, exist_ok=True)
    for name in new:
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f".{destination.name}.tunefactory-partial")
        shutil.copyfile(source / name, partial)
        os.replace(partial, destination)
    for name in previous - set(new):
        (target / name).unlink(missing_ok=True)
    (target / MARKER).write_text(json.dumps({"artifact": artifact_id, "files": sorted(new)}, indent=2))
    return new
