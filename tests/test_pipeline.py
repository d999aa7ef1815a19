"""The whole DAG on the tiny model: cache hits, targeted invalidation, damage, MLflow structure."""

import json
import shutil
import time

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main
from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tests.conftest import BUNDLED_DATA

ALL_STAGES = [
    "fetch[mine]",
    "align[mine]",
    "fetch[pydoc_summaries_test]",
    "align[pydoc_summaries_test]",
    "model",
    "tokenize",
    "train",
    "merge",
    "evaluate[base]",
    "evaluate[tuned]",
]


@pytest.fixture
def recipe_path(write_recipe, workdir):
    folder = workdir / "data"
    folder.mkdir()
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_train.jsonl", folder / "mine.jsonl")
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    return write_recipe(dataset="mine", dataset_dir=str(folder), output_dir=str(workdir / "saves"))


def run(recipe_path, *overrides):
    return finetune(load_recipe(recipe_path, list(overrides)))


def built(summary) -> list[str]:
    return [s.label for s in summary.stages if not s.cached]


def test_cache_hits_and_targeted_invalidation(recipe_path, workdir):
    first = run(recipe_path)
    assert [s.label for s in first.stages] == ALL_STAGES and built(first) == ALL_STAGES
    assert set(first.metrics) == {"base", "tuned"}
    for role in ("base", "tuned"):
        metrics = first.metrics[role]
        assert {"rouge1", "rouge2", "rougeL", "bleu4", "perplexity"} <= set(metrics)
        assert metrics["model_artifact"].startswith("model/" if role == "base" else "merge/")
    tuned_dir = workdir / "artifacts" / "evaluate" / next(s.key for s in first.stages if s.label == "evaluate[tuned]")
    predictions = [json.loads(line) for line in (tuned_dir / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 24 and set(predictions[0]) == {"prompt", "label", "predict"}
    assert (workdir / "saves" / "adapter_config.json").is_file()  # output_dir receives the final adapter

    started = time.monotonic()
    second = run(recipe_path)
    assert built(second) == [] and time.monotonic() - started < 30
    assert {s.prefect_state for s in second.stages} == {"Cached"}
    assert [s.key for s in second.stages] == [s.key for s in first.stages]

    assert built(run(recipe_path, "max_new_tokens=4")) == ["evaluate[base]", "evaluate[tuned]"]
    assert built(run(recipe_path, "lora_rank=8")) == ["train", "merge", "evaluate[tuned]"]

    data_file = workdir / "data" / "mine.jsonl"
    lines = data_file.read_text().splitlines()
    row = json.loads(lines[3])
    row["output"] = "An edited summary."
    lines[3] = json.dumps(row)
    data_file.write_text("\n".join(lines) + "\n")
    assert built(run(recipe_path)) == [
        "fetch[mine]",
        "align[mine]",
        "tokenize",
        "train",
        "merge",
        "evaluate[base]",
        "evaluate[tuned]",
    ]


def test_renamed_and_moved_sources_reuse_everything(recipe_path, workdir):
    first = run(recipe_path)
    (workdir / "saves" / "NOTES.txt").write_text("the user's")
    moved = workdir / "elsewhere"
    moved.mkdir()
    shutil.move(workdir / "data" / "mine.jsonl", moved / "renamed.jsonl")  # the same bytes, named and placed anew
    (moved / "dataset_info.json").write_text(json.dumps({"other": {"file_name": "renamed.jsonl"}}))
    second = run(recipe_path, "dataset=other", f"dataset_dir={moved}")
    assert built(second) == [] and [s.key for s in second.stages] == [s.key for s in first.stages]
    assert (workdir / "saves" / "NOTES.txt").read_text() == "the user's"  # output_dir written again, note kept


def test_damaged_artifact_is_rebuilt_to_the_same_bytes(recipe_path, workdir):
    first = run(recipe_path)
    train_key = next(s.key for s in first.stages if s.label == "train")
    adapter = workdir / "artifacts" / "train" / train_key / "adapter" / "adapter_model.safetensors"
    original = adapter.read_bytes()
    adapter.write_bytes(original[:-8] + b"\0" * 8)
    again = run(recipe_path)
    # Seeded before LoRA initialisation: the rebuild gives the same bytes, so downstream stays valid.
    assert built(again) == ["train"] and adapter.read_bytes() == original
    assert next(s.prefect_state for s in again.stages if s.label == "train") == "Completed"


def test_mlflow_run_structure(recipe_path, workdir):
    first = run(recipe_path)
    second = run(recipe_path)
    mlflow = MlflowClient()
    experiment = mlflow.get_experiment_by_name(first.experiment)
    runs = mlflow.search_runs([experiment.experiment_id], max_results=100)
    children = {}
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        children.setdefault(parent, {})[r.info.run_name] = r
    first_stages, second_stages = children[first.mlflow_run_id], children[second.mlflow_run_id]
    assert set(first_stages) == set(ALL_STAGES) == set(second_stages)
    train_run = first_stages["train"]
    assert train_run.data.tags["cache"] == "miss" and train_run.data.tags["artifact_key"]
    assert train_run.data.params["lora.rank"] == "4" and "logging_steps" not in train_run.data.params
    assert "prefect_task_run_id" in train_run.data.tags and "prefect_flow_run_id" in train_run.data.tags
    losses = mlflow.get_metric_history(train_run.info.run_id, "loss")
    assert len(losses) >= 2 and [m.step for m in losses] == sorted(m.step for m in losses)
    assert mlflow.get_metric_history(train_run.info.run_id, "learning_rate")
    hit = second_stages["train"]
    assert hit.data.tags["cache"] == "hit" and hit.data.tags["built_by_run"] == train_run.info.run_id
    assert hit.data.params == train_run.data.params  # a hit records its keyed config too
    eval_run = first_stages["evaluate[tuned]"]
    assert "rougeL" in eval_run.data.metrics and "perplexity" in eval_run.data.metrics
    assert {"generated_predictions.jsonl", "report.md"} <= {a.path for a in mlflow.list_artifacts(eval_run.info.run_id)}
    parent = mlflow.get_run(first.mlflow_run_id)
    assert "tuned_rougeL" in parent.data.metrics and parent.data.params["lora_rank"] == "4"
    assert first.experiment == "mine-sft-lora"  # runs of one recipe family share an experiment
    assert parent.data.tags["prefect_flow_run_name"] and parent.data.tags["cache_hits"] == "0"
    assert mlflow.get_run(second.mlflow_run_id).data.tags["cache_hits"] == str(len(ALL_STAGES))


def test_dry_run_builds_nothing(capsys, recipe_path, workdir):
    assert main(["run", "--dry-run", str(recipe_path)]) == 0
    out = capsys.readouterr().out
    assert all(label in out for label in ALL_STAGES) and out.count("to build") == len(ALL_STAGES)
    assert not list((workdir / "artifacts").glob("*/*"))
    run(recipe_path)
    assert main(["run", "--dry-run", str(recipe_path), "--set", "lora_rank=8"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split()[0] for line in lines if "to build" in line] == ["train", "merge", "evaluate[tuned]"]
    waiting = {line.split()[0]: line for line in lines if "(after" in line}
    assert set(waiting) == {"merge", "evaluate[tuned]"} and "(after train)" in waiting["merge"]
