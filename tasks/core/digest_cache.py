"""Digests of source files (datasets, model folders, adapters, exams) remembered by their file status.

Planning keys every stage by its sources' content, so each run would otherwise re-read every source
byte: about 1 s per 540 MB here, some 30 GB for a 7B model and its merged copy. As git's index does, a
file whose size, modification and change times and inode match what was recorded when it was hashed
is taken to be unchanged. `tunefactory verify` re-reads everything (`verifying()`).

The cache is an SQLite file in $TUNEFACTORY_CACHE_DIR (default ~/.cache/tunefactory); any problem with it
(read-only home, a damaged file) falls back to hashing, never to a wrong digest.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from tasks.core.hashing import file_sha256

RECENT_SECONDS = 2.0  # a file written this recently may change again within its mtime's resolution
_trust_status = True


def cache_dir() -> Path:
    """Where TuneFactory keeps per-user caches (digests, transformers' option names)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunefactory"
    return Path(os.environ.get("TUNEFACTORY_CACHE_DIR", default))


def _connect() -> sqlite3.Connection:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(folder / "digests.sqlite", timeout=30)
    connection.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                       "ctime_ns INTEGER, inode INTEGER, sha256 TEXT)")
    return connection


def _status(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def source_sha256(path: Path) -> str:
    """sha256 of a source file's bytes, read again only when its file status changed."""
    path = Path(path).resolve()
    status = _status(path)
    try:
        with closing(_connect()) as connection, connection:  # commit, then close
            row = connection.execute("SELECT size, mtime_ns, ctime_ns, inode, sha256 FROM digests WHERE path = ?",
                                     (str(path),)).fetchone()
            if _trust_status and row and tuple(row[:4]) == status:
                return row[4]
            digest = file_sha256(path)
            if _status(path) == status and time.time() - status[1] / 1e9 > RECENT_SECONDS:
                connection.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                                   (str(path), *status, digest))
            return digest
    except sqlite3.Error:
        return file_sha256(path)


@contextmanager
def verifying() -> Iterator[None]:
    """Within the block every source file is re-read (and the cache refreshed), whatever its status says."""
    global _trust_status
    previous, _trust_status = _trust_status, False
    try:
        yield
    finally:
        _trust_status = previous
