"""Comparing runs from MLflow, listing them, and collecting store artifacts that nothing needs."""

from pathlib import Path

import matplotlib.image
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.finetune import run_finetune
from flows.housekeeping import collect_garbage
from tasks.core import model_registry
from tasks.core.recipe import load_recipe
from tasks.core.stage import RunContext, execute
from tasks.core.store import ArtifactStore
from tests.test_store import step


def test_compare_runs_and_gc(write_recipe, workdir, capsys):
    recipe = load_recipe(write_recipe(max_samples=12))
    summaries = [run_finetune(recipe.replace(lora_rank=rank), experiment="family") for rank in (2, 4, 8)]
    capsys.readouterr()  # the trainings' own output

    assert main(["compare", "--experiment", "family", "--metric", "eval_loss", "--out", str(workdir / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "experiment 'family', 3 runs" in out and "lora_rank" in out and "tuned eval_loss" in out
    assert "learning_rate" not in out  # only the keys that differ between the runs
    assert "train tokens/s" in out and "cache hits" in out
    image = matplotlib.image.imread(str(workdir / "c.png"))  # a PNG that opens
    assert image.shape[0] > 100 and image.shape[1] > 100
    compare_run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("family").experiment_id], "attributes.run_name = 'compare'")[0]
    assert {a.path for a in MlflowClient().list_artifacts(compare_run.info.run_id)} == {"c.png", "comparison.txt"}

    assert main(["runs", "--last", "2"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("finished") == 2 and "train" in listing and "cached" in listing and "built" in listing

    store = ArtifactStore(workdir / "artifacts")
    trains = [next(s.key for s in summary.stages if s.stage == "train") for summary in summaries]
    oldest_merge = next(s for s in summaries[0].stages if s.stage == "merge")
    model_registry.register("kept", Path(summaries[0].where["merged model"]), summaries[0].mlflow_run_id,
                            {"artifact.merge": oldest_merge.key})
    dry = collect_garbage(store, keep_last=1, dry_run=True)
    assert f"train/{trains[1]}" in dry.removed and store.lookup("train", trains[1]) is not None  # nothing deleted

    with store.lock("evaluate", next(s.key for s in summaries[1].stages if s.label == "evaluate[tuned]")):
        collected = collect_garbage(store, keep_last=1, dry_run=False)
    assert store.lookup("train", trains[2]) is not None  # the last run's artifacts stay
    assert store.lookup("train", trains[1]) is None  # the middle run's own artifacts go
    assert store.lookup("merge", oldest_merge.key) is not None  # a registered model's merge stays...
    assert store.lookup("train", trains[0]) is not None  # ...with the artifacts it was made from
    assert len(collected.in_use) == 1 and collected.bytes_freed > 0  # the locked one is never deleted
    assert store.lookup("tokenize", next(s.key for s in summaries[2].stages if s.stage == "tokenize"))

    # A run whose training was a cache hit (only an evaluation key changed) shows the training that built it:
    # its throughput and loss curve were '-' and an empty plot.
    again = run_finetune(recipe.replace(lora_rank=8, max_new_tokens=4), experiment="family")
    assert next(s for s in again.stages if s.stage == "train").cached
    capsys.readouterr()
    assert main(["compare", "--experiment", "family", "--last", "2", "--out", str(workdir / "c2.png")]) == 0
    throughput = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train tokens/s"))
    assert "-" not in throughput.split("tokens/s", 1)[1]
    assert main(["compare", "--experiment", "family", "--metric", "rougel", "--out", str(workdir / "c3.png")]) == 1
    assert "--metric rougel: no run of experiment 'family' scored it (scored: " in capsys.readouterr().err
    assert main(["compare", "--out", str(workdir / "nowhere" / "c.png")]) == 1
    assert f"--out {workdir / 'nowhere' / 'c.png'}: folder {workdir / 'nowhere'} does not exist" in (
        capsys.readouterr().err)


def test_runs_and_gc_count_every_flow_that_uses_the_store(write_recipe, workdir, capsys):
    """A data preview's (or an export's) run is one of the last runs too: gc counted only finetune runs, so it
    deleted what the newest preview had just built. It keeps the last N of each flow, so previews do not push
    the last fine-tune out."""
    trained = run_finetune(load_recipe(write_recipe(max_samples=8, do_eval=False)))
    assert main(["data", "preview", str(write_recipe("preview.yaml", max_samples=6))]) == 0
    capsys.readouterr()
    store = ArtifactStore(workdir / "artifacts")
    previewed = [t for t in store.artifacts() if t.ref.stage == "tokenize"
                 and t.ref.key != next(s.key for s in trained.stages if s.stage == "tokenize")]
    assert len(previewed) == 1

    assert main(["runs", "--last", "1"]) == 0
    listing = capsys.readouterr().out
    assert "data-preview" in listing and "tokenize" in listing and "finetune" not in listing
    assert main(["data", "preview", str(write_recipe("preview.yaml", max_samples=6))]) == 0  # a row of previews
    collect_garbage(store, keep_last=1, dry_run=False)
    assert store.lookup("tokenize", previewed[0].ref.key) is not None  # the newest run's artifact stays
    assert store.lookup("train", next(s.key for s in trained.stages if s.stage == "train")) is not None


def test_gc_deletes_nothing_when_the_runs_it_reads_are_not_this_stores(tmp_path, monkeypatch, capsys):
    """What to keep comes from MLflow, what to delete from the store: run where neither belongs to the other,
    gc would keep nothing. It refuses, naming both, and deletes only when forced."""
    store = ArtifactStore(tmp_path / "store")
    ref = execute(step(7), {}, RunContext(home=str(store.root)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = ["--home", str(store.root)]

    assert main(["gc", *home]) == 1  # no mlflow.db here
    assert f"no MLflow store at {elsewhere / 'mlflow.db'}" in capsys.readouterr().err
    assert not (elsewhere / "mlflow.db").exists()  # and none was made by looking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere / 'other.db'}")
    MlflowClient().search_experiments()  # a tracking store, with no runs of this store
    assert main(["gc", *home]) == 1
    assert f"used an artifact of {store.root}, so it would delete all 1" in capsys.readouterr().err
    assert store.lookup(ref.stage, ref.key) is not None

    assert main(["gc", "--dry-run", "--force", *home]) == 0
    assert f"would delete {ref.id}" in capsys.readouterr().out and store.lookup(ref.stage, ref.key) is not None
    assert main(["gc", "--force", *home]) == 0
    assert store.lookup(ref.stage, ref.key) is None

    assert main(["gc", "--home", str(tmp_path / "nostore")]) == 1
    assert f"no artifact store at {tmp_path / 'nostore'}" in capsys.readouterr().err


def test_compare_reads_every_objectives_trainer_run(workdir):
    """rm, dpo/kto and ppo runs train in stages labelled reward, dpo, kto, ppo: compare looked for 'train' only,
    so their tokens/s and loss curves were blank; a chained recipe's trainer ('sft:train') is not the run's own."""
    from flows.compare import describe, trainer_run
    from tasks.core import tracking

    parent = tracking.start_parent("rm-run", {"stage": "rm"}, {"tunefactory.flow": "finetune"}, "objectives")
    upstream = tracking.start_stage(parent, "sft:train", {"stage": "train"})
    own = tracking.start_stage(parent, "reward", {"stage": "reward"})
    tracking.log_metrics(upstream, {"tokens_per_second": 1.0})
    tracking.log_metrics(own, {"tokens_per_second": 6365.0})
    for run_id in (upstream, own, parent):
        tracking.finish(run_id, ok=True)
    run = MlflowClient().get_run(parent)
    assert trainer_run(run).info.run_id == own
    assert "6365.0" in next(line for line in describe([run], "eval_loss").splitlines() if "tokens/s" in line)


def test_reading_runs_where_there_is_no_tracking_store_creates_none(tmp_path, monkeypatch, capsys):
    """`runs` in another folder left an empty mlflow.db behind (which then got past gc's check); a count of 0
    ended in an MLflow traceback."""
    import pytest

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["runs"]) == 0 and "no MLflow store at" in capsys.readouterr().out
    assert main(["compare"]) == 1 and "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
    for argv in (["runs", "--last", "0"], ["compare", "--last", "-1"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "give a whole number of at least 1" in capsys.readouterr().err


def test_gc_keeps_interrupted_checkpoints_for_a_resume_unless_asked(tmp_path, capsys, monkeypatch):
    """Staged checkpoints were never collected, not even with --force: a full fine-tune's could stay for good."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # not the checkout's
    store = ArtifactStore(tmp_path / "store")
    staged = store.staging("train", "k" * 64) / "checkpoint-4"
    staged.mkdir(parents=True)
    (staged / "weights.bin").write_bytes(b"\0" * 2**20)
    kept = collect_garbage(store, keep_last=1, dry_run=False, force=True)
    assert staged.is_dir() and kept.staged_kept == [f"train/{'k' * 64}"]
    assert "kept 1.0 MiB of checkpoints of 1 interrupted build for" in kept.summary(dry_run=False)
    with store.lock("train", "k" * 64):  # a build running now keeps its checkpoints whatever is asked
        assert collect_garbage(store, 1, dry_run=False, force=True, staging=True).in_use and staged.is_dir()
    assert main(["gc", "--home", str(store.root), "--force", "--staging"]) == 0
    assert not staged.exists() and "freed 1.0 MiB" in capsys.readouterr().out


def test_gc_keeps_what_a_running_build_reads(tmp_path, monkeypatch):
    """gc deleted an input of a build still running (only the built key's lock was held, and a run tags its
    artifacts once they are done), and the build failed reading it; also while a heavy build queued for its
    slot behind another one."""
    import json
    import threading
    import time

    from tasks.core import stage as stages
    from tasks.core.stage import Built, Stage
    from tests.test_store import ValueConfig, write_upstream_value

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = ArtifactStore(tmp_path / "store")
    run = RunContext(home=str(store.root))
    up = execute(step(1), {}, run)
    during = []

    def collect_then_read(config, ctx, out) -> Built:
        during.append(collect_garbage(store, keep_last=1, dry_run=False, force=True))
        return write_upstream_value(config, ctx, out)

    down = Stage(name="down", plan=None, build=collect_then_read, code=("tasks.core.store",), libraries=())
    built = execute(down.step("down", ValueConfig(value=0)), {"up": up}, run)
    assert up.id not in during[0].removed and json.loads(store.lookup(built.stage, built.key).part("value")
                                                         .read_text()) == {"value": 10}
    record = store.root / ".locks" / f"down-{built.key}.reads"
    assert not record.exists()  # gone with the build
    record.write_text(json.dumps([up.id]))  # as a killed build leaves it: its lock is free
    assert up.id in collect_garbage(store, keep_last=1, dry_run=True, force=True).removed
    assert record.exists()  # a dry run changes nothing
    assert up.id in collect_garbage(store, keep_last=1, dry_run=False, force=True).removed
    assert not record.exists()

    up = execute(step(2), {}, run)
    heavy = Stage(name="heavy", plan=None, build=write_upstream_value, code=("tasks.core.store",), libraries=(),
                  heavy=True)
    queued = heavy.step("heavy", ValueConfig(value=0))
    outcome = []
    with stages._HEAVY_SLOT:  # another heavy build runs: this one waits for the slot, its inputs opened
        waiter = threading.Thread(target=lambda: outcome.append(execute(queued, {"up": up}, run)))
        waiter.start()
        deadline = time.monotonic() + 30
        while not list((store.root / ".locks").glob("heavy-*.reads")):
            assert time.monotonic() < deadline, "the queued build recorded no reads"
            time.sleep(0.05)
        assert up.id not in collect_garbage(store, keep_last=1, dry_run=False, force=True).removed
    waiter.join(timeout=30)
    assert outcome and store.lookup(outcome[0].stage, outcome[0].key) is not None


def test_gc_keeps_the_artifacts_of_a_run_still_going_however_many_ran_since(tmp_path, monkeypatch):
    from tasks.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = ArtifactStore(tmp_path / "store")
    refs = [execute(step(value), {}, RunContext(home=str(store.root))) for value in (1, 2)]

    def finetune_run(ref, ok: bool | None, on: str = str(store.root)) -> None:
        parent = tracking.start_parent(None, {}, {"tunefactory.flow": "finetune", "store": on}, "gc-test")
        tracking.start_stage(parent, "demo", {"stage": ref.stage, "artifact_key": ref.key})
        if ok is not None:
            tracking.finish(parent, ok)

    finetune_run(refs[0], ok=None)  # started first, still going
    finetune_run(refs[1], ok=True)  # finished since
    removed = collect_garbage(store, keep_last=1, dry_run=False).removed
    assert removed == [] and store.lookup(refs[0].stage, refs[0].key) is not None

    # The last N are this store's finished runs: a failed run, or one on another store sharing the tracking store,
    # does not push refs[1]'s run out of --keep-last 1; what a run that failed since built is kept for its re-run.
    tracking.finish(tracking.running_runs(("finetune",))[0].info.run_id, ok=True)
    finetune_run(refs[0], ok=False)
    finetune_run(refs[0], ok=True, on=str(tmp_path / "elsewhere"))
    assert collect_garbage(store, keep_last=1, dry_run=False).removed == []
    finetune_run(refs[1], ok=True)  # a newer finished run: the failed one is now older than the last N
    removed = collect_garbage(store, keep_last=1, dry_run=False).removed
    assert removed == [f"{refs[0].stage}/{refs[0].key}"] and store.lookup(refs[1].stage, refs[1].key) is not None


def test_gc_keeps_what_a_running_run_was_served_while_an_earlier_step_builds(tmp_path, monkeypatch):
    """A run names a stage's artifact in MLflow when the stage's task ends, not when the run gets to it in plan
    order: an artifact served at once (an evaluation cached while training went on) was no run's and no build's,
    gc deleted it, and the run failed reading it after the long step."""
    import shutil
    import time

    import pytest
    from prefect import flow

    from flows.finetune import collect, stage_runner, submit_all
    from flows.plan import Plan
    from tasks.core import tracking
    from tasks.core.stage import Stage
    from tests.test_store import VALUE, ValueConfig, write_value

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = ArtifactStore(tmp_path / "store")
    served = execute(step(7), {}, RunContext(home=str(store.root)))  # built before, by no run
    during = []

    def collect_while_building(config, ctx, out):
        time.sleep(2)  # the served step's task has long ended
        during.append(collect_garbage(store, keep_last=1, dry_run=False, force=True))
        return write_value(config, ctx, out)

    slow = Stage(name="slow", plan=None, build=collect_while_building, code=("tasks.core.store",), libraries=())
    plan = Plan((slow.step("slow", ValueConfig(value=1)), VALUE.step("served", ValueConfig(value=7))))

    @flow(task_runner=stage_runner(2))
    def two_steps():
        parent = tracking.start_parent(None, {}, {"tunefactory.flow": "finetune", "store": str(store.root)}, "race")
        stage_runs = {s.label: tracking.start_stage(parent, s.label, {"stage": s.stage.name}) for s in plan}
        results = collect(plan, submit_all(plan, store, stage_runs), store, stage_runs)
        tracking.finish(parent, ok=True)
        return results

    results = two_steps()
    assert served.id not in during[0].removed and store.lookup(served.stage, served.key) is not None
    assert [r.key for r in results][1] == served.key

    # An artifact gone all the same (deleted by hand): the run fails, and no stage run is left RUNNING in MLflow.
    def delete_while_building(config, ctx, out):
        time.sleep(2)
        shutil.rmtree(store.path(served.stage, served.key))
        return write_value(config, ctx, out)

    slow = Stage(name="slow", plan=None, build=delete_while_building, code=("tasks.core.store",), libraries=())
    plan = Plan((slow.step("slow", ValueConfig(value=2)), VALUE.step("served", ValueConfig(value=7))))
    with pytest.raises(Exception, match="is missing or was replaced"):
        two_steps()
    newest = tracking.newest_runs(1)[0]
    assert {s.info.run_name: s.info.status for s in tracking.stage_runs(newest)} == {"slow": "FINISHED",
                                                                                     "served": "FAILED"}


def test_runs_lists_a_build_that_failed_as_failed(tmp_path, monkeypatch):
    """`runs` read the cache tag a build sets as it starts ("miss": built) over the run's status."""
    from flows.housekeeping import recent_runs
    from tasks.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent(None, {}, {"tunefactory.flow": "finetune"}, "listing")
    for label, ok in (("align[bad]", False), ("model", True)):
        tracking.finish(tracking.start_stage(parent, label, {"stage": label.split("[")[0], "cache": "miss"}), ok)
    tracking.finish(parent, ok=False)
    listing = recent_runs(1)
    assert "align[bad]                   failed" in listing and "model                        built" in listing


def test_gc_keep_last_0_says_it_read_registered_models_only(tmp_path, monkeypatch):
    import pytest

    from tasks.core import tracking
    from tasks.core.errors import TuneFactoryError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = ArtifactStore(tmp_path / "store")
    ref = execute(step(1), {}, RunContext(home=str(store.root)))
    parent = tracking.start_parent(None, {}, {"tunefactory.flow": "finetune", "store": str(store.root)}, "zero")
    tracking.start_stage(parent, "demo", {"stage": ref.stage, "artifact_key": ref.key})
    tracking.finish(parent, ok=True)
    assert collect_garbage(store, keep_last=1, dry_run=True).removed == []
    with pytest.raises(TuneFactoryError, match=r"none of the registered models \(--keep-last 0 reads no runs\)"):
        collect_garbage(store, keep_last=0, dry_run=True)


def test_compare_of_runs_that_scored_nothing_still_compares(tmp_path, monkeypatch):
    """A training-only experiment (no evaluation) has no metric to refuse a misspelling against: it compares."""
    from flows.compare import compare
    from tasks.core import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for rate in ("1e-4", "2e-4"):
        parent = tracking.start_parent(None, {"learning_rate": rate}, {"tunefactory.flow": "finetune"}, "unscored")
        tracking.finish(parent, ok=True)
    compared = compare("unscored", "rougeL", 5, tmp_path / "c.png")
    assert "learning_rate" in compared.table and compared.figure.is_file()
