"""Comparing runs from MLflow, listing them, and collecting store artifacts that nothing needs."""

from pathlib import Path

import matplotlib.image
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.finetune import run_finetune
from flows.housekeeping import collect_garbage
from tasks.core import model_registry
from tasks.core.recipe import load_recipe
from tasks.core.store import ArtifactStore


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
