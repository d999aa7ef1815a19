import json

import pytest

from tasks.core.stage import Runtime, execute, make_spec
from tasks.core.store import ArtifactStore


def spec_for(value: int):
    return make_spec("demo", "demo", {"value": value}, {}, ["tasks.core.store"], ())


def write_value(config, ctx, out):
    (out / "value.json").write_text(json.dumps(config))
    return {"written": True}


def test_build_publishes_with_manifest_and_reuses(tmp_path):
    spec = spec_for(1)
    runtime = Runtime(home=str(tmp_path))
    ref = execute(spec, write_value, runtime)
    store = ArtifactStore(tmp_path)
    manifest = store.lookup(ref.stage, ref.key)
    assert manifest is not None
    assert [f["path"] for f in manifest.data["files"]] == ["value.json"]
    assert manifest.data["config"] == {"value": 1}
    calls = []
    execute(spec, lambda c, ctx, out: calls.append(1), runtime)
    assert calls == []  # reused, not rebuilt


def test_keys_change_with_config_and_inputs():
    assert spec_for(1).key == spec_for(1).key
    assert spec_for(1).key != spec_for(2).key
    downstream_a = make_spec("down", "down", {}, {"up": spec_for(1)}, ["tasks.core.store"], ())
    downstream_b = make_spec("down", "down", {}, {"up": spec_for(2)}, ["tasks.core.store"], ())
    assert downstream_a.key != downstream_b.key


@pytest.mark.parametrize("damage", ["edit", "delete_manifest", "extra_file", "delete_file"])
def test_damaged_artifact_is_not_valid_and_is_rebuilt(tmp_path, damage):
    spec = spec_for(3)
    runtime = Runtime(home=str(tmp_path))
    execute(spec, write_value, runtime)
    store = ArtifactStore(tmp_path)
    directory = store.path(spec.stage, spec.key)
    if damage == "edit":
        (directory / "value.json").write_text('{"value": 4}')
    elif damage == "delete_manifest":
        (directory / "manifest.json").unlink()
    elif damage == "extra_file":
        (directory / "stray.bin").write_bytes(b"x")
    else:
        (directory / "value.json").unlink()
    assert store.lookup(spec.stage, spec.key) is None
    execute(spec, write_value, runtime)
    assert store.lookup(spec.stage, spec.key) is not None
    assert json.loads((directory / "value.json").read_text()) == {"value": 3}


def test_failed_build_publishes_nothing_and_keeps_existing_artifacts(tmp_path):
    runtime = Runtime(home=str(tmp_path))
    kept = execute(spec_for(5), write_value, runtime)

    def fail(config, ctx, out):
        (out / "half.json").write_text("{")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        execute(spec_for(6), fail, runtime)
    store = ArtifactStore(tmp_path)
    assert not store.path("demo", spec_for(6).key).exists()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [kept.key]  # no temp dir left behind
    assert store.lookup(kept.stage, kept.key) is not None
