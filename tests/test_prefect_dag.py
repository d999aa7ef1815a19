"""What Prefect records is the plan: the task graph read back from Prefect's API, and stages run side by side."""

import itertools
import json

from prefect.client.orchestration import get_client

from flows.finetune import run_finetune
from flows.plan import plan_run
from tasks.core.recipe import load_recipe
from tests.conftest import finished_task_runs


def recorded_edges(flow_run_id: str, expected_tasks: int) -> set[tuple[str, str]]:
    """(upstream task run name, task run name) for every input Prefect recorded in a flow run."""
    with get_client(sync_client=True) as client:
        task_runs = finished_task_runs(client, flow_run_id, expected_tasks)
    names = {run.id: run.name for run in task_runs}
    return {(names[source.id], run.name) for run in task_runs for sources in run.task_inputs.values()
            for source in sources}


def test_prefect_records_the_plans_graph(write_recipe):
    recipe = load_recipe(write_recipe())
    plan = plan_run(recipe)
    summary = run_finetune(recipe)
    expected = {(upstream, step.label) for step in plan for upstream in step.inputs.values()}
    assert ("merge", "evaluate[tuned]") in expected and ("model", "evaluate[base]") in expected
    assert recorded_edges(summary.flow_run_id, len(plan.steps)) == expected
    again = run_finetune(recipe)  # served from the store: the same graph, every task Cached
    assert {s.prefect_state for s in again.stages} == {"Cached"}
    assert recorded_edges(again.flow_run_id, len(plan.steps)) == expected


def test_parallel_stages_give_the_same_artifacts_and_never_overlap_heavy_builds(write_recipe, workdir):
    recipe = load_recipe(write_recipe())
    sequential = run_finetune(recipe, home=str(workdir / "one"), parallel=1)
    parallel = run_finetune(recipe, home=str(workdir / "four"), parallel=4)
    assert [(s.label, s.key) for s in parallel.stages] == [(s.label, s.key) for s in sequential.stages]
    spans = []
    for result in parallel.stages:
        manifest = json.loads((workdir / "four" / result.stage / result.key / "manifest.json").read_text())
        if result.stage in ("model", "train", "merge", "evaluate"):
            spans.append((manifest["build_started"], manifest["build_started"] + manifest["build_seconds"]))
    spans.sort()
    assert all(end <= next_start + 0.05 for (_, end), (next_start, _) in itertools.pairwise(spans))


def test_data_preview_runs_its_stages_side_by_side_in_a_fresh_process(write_recipe, workdir, monkeypatch):
    """Every flow runs its stages on the recipe's task runner (data preview had Prefect's, which starts them all
    at once), and stages that first import transformers side by side do not race: a fresh process failed with
    "module 'transformers' has no attribute 'PreTrainedTokenizerBase'", reported as the dataset's fault."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "TUNEFACTORY_PARALLEL_STAGES": "4",
           "TUNEFACTORY_CACHE_DIR": str(workdir / "cache")}
    recipe = str(write_recipe())
    # A warm cache (of transformers' option names) is what lets planning skip importing transformers.
    monkeypatch.setenv("TUNEFACTORY_CACHE_DIR", env["TUNEFACTORY_CACHE_DIR"])
    plan_run(load_recipe(recipe))
    done = subprocess.run([sys.executable, "-m", "flows", "data", "preview", recipe], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "padding_share at per_device_train_batch_size" in done.stdout
