"""Source digests remembered by file status, and `tunefactory verify`, which trusts nothing."""

from __future__ import annotations

import json
import os
import time

import pytest

from flows.cli import main
from flows.verify import verify_store
from tasks.core import digest_cache
from tasks.core.digest_cache import source_sha256, verifying
from tasks.core.hashing import file_sha256, tree_digest
from tasks.core.stage import RunContext, execute
from tasks.core.store import ArtifactStore
from tests.test_store import step


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Count the files source_sha256 really reads; a cache of this test's own."""
    monkeypatch.setenv("TUNEFACTORY_CACHE_DIR", str(tmp_path / "cache"))
    counted: list[str] = []

    def counting(path):
        counted.append(os.path.basename(path))
        return file_sha256(path)

    monkeypatch.setattr(digest_cache, "file_sha256", counting)
    return counted


def settled(path, text: str):
    """Write a file and date it a minute back (an old file, as sources usually are)."""
    path.write_text(text)
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def test_an_unchanged_source_is_read_once(tmp_path, reads):
    data = settled(tmp_path / "rows.jsonl", '{"a": 1}\n')
    assert source_sha256(data) == source_sha256(data) == file_sha256(data)
    assert reads == ["rows.jsonl"]


def test_a_source_changed_in_place_is_read_again_even_with_its_old_size_and_mtime(tmp_path, reads):
    data = settled(tmp_path / "rows.jsonl", '{"a": 1}\n')
    before = source_sha256(data)
    stat = data.stat()
    data.write_text('{"a": 2}\n')  # same size
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime: only ctime tells
    assert source_sha256(data) == file_sha256(data) != before
    assert reads == ["rows.jsonl", "rows.jsonl"]


def test_a_file_written_just_now_is_not_trusted_yet(tmp_path, reads):
    data = tmp_path / "fresh.jsonl"
    data.write_text("x\n")  # its mtime may not yet tell a second write in the same tick apart
    source_sha256(data)
    source_sha256(data)
    assert reads == ["fresh.jsonl", "fresh.jsonl"]


def test_verifying_reads_everything_and_a_folder_digest_uses_the_cache(tmp_path, reads):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        settled(folder / name, name)
    first = tree_digest(folder)
    assert tree_digest(folder) == first and len(reads) == 2
    with verifying():
        assert tree_digest(folder) == first
    assert len(reads) == 4


def test_verify_finds_damage_a_cache_hit_cannot_see_and_has_it_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    ref = execute(step(7), {}, RunContext(home=str(tmp_path)))
    value = store.path(ref.stage, ref.key) / "value.json"
    stat = value.stat()
    value.write_text(json.dumps({"value": 8}))  # same size, then the old mtime back: bit rot
    os.utime(value, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.lookup(ref.stage, ref.key) is not None  # the quick check trusts the status
    result = verify_store(store)
    assert result.damaged == [ref.id] and result.checked == 1
    assert store.lookup(ref.stage, ref.key) is None  # set aside: the next run rebuilds it
    rebuilt = execute(step(7), {}, RunContext(home=str(tmp_path)))
    assert json.loads((store.path(rebuilt.stage, rebuilt.key) / "value.json").read_text()) == {"value": 7}
    assert verify_store(store).damaged == []
    assert main(["verify", "--home", str(tmp_path)]) == 0


def test_verify_of_a_store_that_is_not_there_is_an_error(tmp_path, capsys):
    assert main(["verify", "--home", str(tmp_path / "artifcats")]) == 1  # a typo passes no check
    expected = f"tunefactory verify: no artifact store at {tmp_path / 'artifcats'} (--home or TUNEFACTORY_HOME)"
    assert capsys.readouterr().err.strip() == f"tunefactory: error: {expected}"


def test_folders_without_a_manifest_are_reported_by_verify_and_freed_by_gc(tmp_path):
    """A damaged artifact set aside, a torn manifest and a lost one: verify said nothing of the last two and gc kept
    all three (a merged model's worth of disk each) until a run happened to rebuild the same key."""
    from flows.housekeeping import collect_garbage

    store = ArtifactStore(tmp_path)
    refs = [execute(step(value), {}, RunContext(home=str(tmp_path))) for value in (1, 2, 3, 4)]
    folders = [store.path(ref.stage, ref.key) for ref in refs]
    (folders[0] / "manifest.json").rename(folders[0] / "manifest.damaged.json")  # as verify sets one aside
    (folders[1] / "manifest.json").write_text("{")
    (folders[2] / "manifest.json").unlink()
    mine = tmp_path / "outputs" / "run1"  # a user's folder in the store (an output_dir there, say): not an artifact
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    assert sorted(verify_store(store).damaged) == sorted([f"{refs[0].id} (set aside earlier)",
                                                         f"{refs[1].id} (no readable manifest)",
                                                         f"{refs[2].id} (no readable manifest)"])
    with store.lock(refs[2].stage, refs[2].key):  # a build of that key is running: left alone
        removed = collect_garbage(store, keep_last=0, dry_run=False, force=True).removed
    assert sorted(removed) == sorted([refs[3].id, f"{refs[0].id} (damaged)", f"{refs[1].id} (damaged)"])
    assert [p.exists() for p in folders] == [False, False, True, False]
    assert (mine / "notes.txt").read_text() == "keep"


def test_a_touched_artifact_file_is_read_once_not_at_every_lookup(tmp_path, reads):
    store = ArtifactStore(tmp_path / "store")
    ref = execute(step(7), {}, RunContext(home=str(store.root)))
    value = store.path(ref.stage, ref.key) / "value.json"
    past = time.time() - 60
    os.utime(value, (past, past))  # touched: the same bytes, another mtime than the manifest's
    assert store.lookup(ref.stage, ref.key) is not None and store.lookup(ref.stage, ref.key) is not None
    assert reads == ["value.json"]  # hashed once for its new status, then taken from the digest cache
    value.write_text('{"value": 8}')  # changed bytes, same size: the new status is hashed again, and refused
    os.utime(value, (past - 60, past - 60))
    assert store.lookup(ref.stage, ref.key) is None
