"""The store and the stage runner: publish, reuse, damage, content keys, stale temporaries."""

import json
import os

import pytest

from tasks.core.stage import Built, RunContext, Stage, StageConfig, execute, run_in_process
from tasks.core.store import ArtifactStore


class ValueConfig(StageConfig):
    value: int


def write_value(config, ctx, out):
    (out / "value.json").write_text(json.dumps({"value": config.value}))
    return Built("value", {"value": "value.json"}, {"written": True})


def write_upstream_value(config, ctx, out):
    upstream = json.loads(ctx.inputs["up"].part("value").read_text())["value"]
    (out / "value.json").write_text(json.dumps({"value": upstream * 10}))
    return Built("value", {"value": "value.json"})


VALUE = Stage(name="demo", plan=None, build=write_value, code=("tasks.core.store",), libraries=())
DOWN = Stage(name="down", plan=None, build=write_upstream_value, code=("tasks.core.store",), libraries=())


def step(value: int, stage: Stage = VALUE, label: str = "demo"):
    return stage.step(label, ValueConfig(value=value))


def test_build_publishes_with_manifest_and_reuses(tmp_path):
    run = RunContext(home=str(tmp_path))
    ref = execute(step(1), {}, run)
    artifact = ArtifactStore(tmp_path).lookup(ref.stage, ref.key)
    assert artifact is not None and artifact.kind == "value" and artifact.info == {"written": True}
    assert [f["path"] for f in artifact.manifest["files"]] == ["value.json"]
    assert artifact.manifest["config"] == {"value": 1} and artifact.ref == ref
    calls = []
    again = Stage(name="demo", plan=None, build=lambda c, ctx, out: calls.append(1), code=("tasks.core.store",),
                  libraries=())
    assert execute(again.step("demo", ValueConfig(value=1)), {}, run) == ref
    assert calls == []  # reused, not rebuilt


def test_keys_cover_config_and_input_content_not_input_names(tmp_path):
    first, second = run_in_process([step(1)], tmp_path)["demo"], run_in_process([step(2)], tmp_path)["demo"]
    assert first.key != second.key and first.digest != second.digest
    down = DOWN.step("down", ValueConfig(value=0), {"up": step(1)})
    assert DOWN.key(down.config, {"up": first}) != DOWN.key(down.config, {"up": second})
    # An input rebuilt under another key with the same bytes leaves the downstream key unchanged.
    renamed = first.model_copy(update={"key": "0" * 64})
    assert DOWN.key(down.config, {"up": first}) == DOWN.key(down.config, {"up": renamed})


@pytest.mark.parametrize("damage", ["edit", "edit_same_size_keep_mtime", "delete_manifest", "extra_file",
                                    "delete_file"])
def test_damaged_artifact_is_not_valid_and_is_rebuilt(tmp_path, damage):
    run = RunContext(home=str(tmp_path))
    ref = execute(step(3), {}, run)
    store = ArtifactStore(tmp_path)
    directory = store.path(ref.stage, ref.key)
    value = directory / "value.json"
    if damage == "edit":
        value.write_text('{"value": 44}')
    elif damage == "edit_same_size_keep_mtime":  # only the full check (tunefactory verify) can see this
        stat = value.stat()
        value.write_text('{"value": 4}')
        os.utime(value, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert store.lookup(ref.stage, ref.key) is not None
        assert store.lookup(ref.stage, ref.key, full=True) is None
        return
    elif damage == "delete_manifest":
        (directory / "manifest.json").unlink()
    elif damage == "extra_file":
        (directory / "stray.bin").write_bytes(b"x")
    else:
        value.unlink()
    assert store.lookup(ref.stage, ref.key) is None
    execute(step(3), {}, run)
    assert store.lookup(ref.stage, ref.key, full=True) is not None
    assert json.loads(value.read_text()) == {"value": 3}


def test_failed_build_publishes_nothing_and_keeps_existing_artifacts(tmp_path):
    run = RunContext(home=str(tmp_path))
    kept = execute(step(5), {}, run)

    def fail(config, ctx, out):
        (out / "half.json").write_text("{")
        raise RuntimeError("boom")

    failing = Stage(name="demo", plan=None, build=fail, code=("tasks.core.store",), libraries=())
    with pytest.raises(RuntimeError):
        execute(failing.step("demo", ValueConfig(value=6)), {}, run)
    store = ArtifactStore(tmp_path)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [kept.key]  # no temp dir left behind
    assert store.lookup(kept.stage, kept.key) is not None


def test_stale_temporaries_of_killed_builds_are_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    stale = tmp_path / "demo" / f".tmp-{'a' * 64}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "half.bin").write_bytes(b"x")
    live_key = "b" * 64
    live = tmp_path / "demo" / f".tmp-{live_key}-cafecafe"
    live.mkdir()
    with store.lock("demo", live_key):  # another build of that key is running
        execute(step(7), {}, RunContext(home=str(tmp_path)))
        assert not stale.exists() and live.exists()


def test_store_root_that_is_a_file_is_refused(tmp_path):
    from tasks.core.errors import TuneFactoryError

    (tmp_path / "file").write_text("x")
    with pytest.raises(TuneFactoryError, match="is a file, not a folder"):
        ArtifactStore(tmp_path / "file")


def test_a_run_waiting_for_another_builds_lock_stops_when_interrupted(tmp_path, caplog):
    """A run that wanted a key another process was building waited on its lock through Ctrl-C, then built."""
    import threading
    import time

    from tasks.core.stage import BuildInterrupted, clear_stop, request_stop

    run, wanted = RunContext(home=str(tmp_path)), step(7)
    key = wanted.stage.key(wanted.config, {})
    held = ArtifactStore(tmp_path).lock(wanted.stage.name, key)
    held.acquire()  # another builder (flock: a second lock object conflicts even in this process)
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(_outcome(lambda: execute(wanted, {}, run))))
    with caplog.at_level("INFO", logger="tunefactory"):
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and f"waiting: another run is building demo/{key[:12]}" in caplog.text
        started = time.monotonic()
        request_stop()
        waiter.join(timeout=10)
    try:
        assert not waiter.is_alive() and time.monotonic() - started < 3
        assert isinstance(outcome[0], BuildInterrupted)
        assert ArtifactStore(tmp_path).lookup(wanted.stage.name, key) is None  # nothing built after the stop
    finally:
        clear_stop()
        held.release()


def _outcome(call):
    try:
        return call()
    except BaseException as exc:  # handed to the test's thread
        return exc


def test_a_multi_node_build_whose_key_another_process_holds_stops_instead_of_waiting(tmp_path):
    """Two nodes of one training on a shared store: node 1 waited on node 0's lock while node 0's ranks waited
    for node 1's at the rendezvous, for good."""
    from tasks.core.errors import TuneFactoryError

    class NodesConfig(StageConfig):
        value: int
        nnodes: int

    wanted = VALUE.step("demo", NodesConfig(value=1, nnodes=2))
    key = wanted.stage.key(wanted.config, {})
    with ArtifactStore(tmp_path).lock(wanted.stage.name, key):
        with pytest.raises(TuneFactoryError, match="with nnodes > 1 each node needs a store of its own"):
            execute(wanted, {}, RunContext(home=str(tmp_path)))


def test_a_stop_request_left_by_a_failed_run_does_not_stop_a_build_that_never_waited(tmp_path):
    """The check after taking a key's lock is for a run interrupted while it waited; it also failed builds that
    took the lock at once, after an earlier flow in the process had failed (its request outlives it)."""
    from tasks.core.stage import clear_stop, request_stop

    request_stop()
    try:
        ref = execute(step(11), {}, RunContext(home=str(tmp_path)))
    finally:
        clear_stop()
    assert ArtifactStore(tmp_path).lookup(ref.stage, ref.key) is not None
