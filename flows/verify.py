"""`tunefactory verify`: re-read every byte the cache trusts by file status.

Day to day a cache hit checks each artifact file's size and modification time against its manifest,
and planning takes a source file's digest from tasks.core.digest_cache while its status is unchanged:
quick at any model size, but blind to bytes that changed without their status changing (a disk
fault, a tool that restores mtimes). Verification re-hashes every artifact file and, given a recipe,
every source it plans from. A damaged artifact's manifest is set aside (`manifest.damaged.json`), so
the next run rebuilds it; its files stay until then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tasks.core.digest_cache import verifying
from tasks.core.errors import TuneFactoryError
from tasks.core.recipe import Recipe
from tasks.core.store import MANIFEST, ArtifactStore


@dataclass
class Verification:
    checked: int = 0
    bytes_read: int = 0
    damaged: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        state = f"{len(self.damaged)} damaged (rebuilt on the next run)" if self.damaged else "all intact"
        return (f"verified {self.checked} artifacts, {self.bytes_read / 2**20:.1f} MiB read in {self.seconds:.1f} s: "
                f"{state}")


def verify_store(store: ArtifactStore, recipe: Recipe | None = None) -> Verification:
    """Re-hash every artifact in the store (and, with a recipe, the sources it plans from)."""
    if not store.root.is_dir():  # a mistyped --home is not an intact store
        raise TuneFactoryError(f"tunefactory verify: no artifact store at {store.root} (--home or TUNEFACTORY_HOME)")
    started = time.monotonic()
    result = Verification()
    if recipe is not None:
        from flows.plan import plan_run

        with verifying():
            plan_run(recipe, store)  # re-reads each source and refreshes its cached digest
    for artifact in list(store.artifacts()):
        ref = artifact.ref
        result.checked += 1
        result.bytes_read += sum(entry["size"] for entry in artifact.manifest.get("files", []))
        if store.lookup(ref.stage, ref.key, full=True) is None:
            result.damaged.append(ref.id)
            (artifact.path / MANIFEST).rename(artifact.path / "manifest.damaged.json")
    for folder in store.unpublished():  # no run uses these: rebuilt when a run needs the key, or removed by gc
        name = f"{folder.parent.name}/{folder.name}"
        if name not in result.damaged:  # not the ones set aside just now
            why = "set aside earlier" if (folder / "manifest.damaged.json").exists() else "no readable manifest"
            result.damaged.append(f"{name} ({why})")
    result.seconds = time.monotonic() - started
    return result
