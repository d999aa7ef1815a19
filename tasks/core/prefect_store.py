"""Prefect's task cache, answered by the artifact store: the store is the one cache authority.

A stage task's cache key is its artifact key (`StoreCache`). Its result storage (`StoreRecords`)
holds no records of its own: a record exists exactly when the store holds a valid artifact for that
key, and reading it returns the artifact's reference. So a task shows as Cached in the Prefect UI
precisely when the store can serve it, and a lost or damaged artifact is rebuilt whatever Prefect
remembers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer

from tasks.core.hashing import stable_hash
from tasks.core.store import ArtifactStore

PREFIX = "tunefactory"


def record_key(stage: str, key: str) -> str:
    return f"{PREFIX}-{stage}-{key}"


@dataclass
class StoreCache(CachePolicy):
    """A stage task's cache key is its artifact key, computed from its (resolved) upstream artifacts."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        step = inputs["step"]
        return record_key(step.stage.name, step.stage.key(step.config, inputs["inputs"]))


STORE_CACHE = StoreCache()


class StoreRecords(WritableFileSystem):
    """Result storage whose records are the store's artifacts (read-only: publishing is the write)."""

    _block_type_name = "TuneFactory artifact store"
    _description = "Answers Prefect's task cache from TuneFactory's content-addressed artifact store."

    root: str

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        stage, key = path.removeprefix(f"{PREFIX}-").split("-", 1)
        found = ArtifactStore(self.root).lookup(stage, key)
        if found is None:
            raise ValueError(f"no valid artifact {stage}/{key} in {self.root}")
        metadata = ResultRecordMetadata(storage_key=path, serializer=JSONSerializer(), expiration=None)
        return ResultRecord(metadata=metadata, result=found.ref).serialize()

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        return path  # the artifact published by the task is the record

    async def awrite_path(self, path: str, content: bytes) -> str:
        return path


def records_block(root: Path) -> StoreRecords:
    """The store's result-storage block, saved under a name derived from its root (Prefect needs task
    result storage saved server-side; it then also shows in the UI's Blocks page)."""
    block = StoreRecords(root=str(root))
    block.save(f"{PREFIX}-store-{stable_hash(str(root))[:12]}", overwrite=True)
    return block
