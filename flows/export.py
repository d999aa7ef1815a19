"""The export flow (`tunefactory export RECIPE`, LlamaFactory's `llamafactory-cli export`): a base model merged
with an adapter, written to export_dir in the shard size and format asked for, with a tokenizer whose chat
template renders the training template's text."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.finetune import collect, experiment_for, stage_runner, submit_all
from flows.plan import plan_export
from flows.user_output import write_into
from tasks.core import tracking
from tasks.core.recipe import Recipe
from tasks.core.store import ArtifactStore


@flow(name="export", task_runner=stage_runner())  # Prefect's default runs every stage at once
def export_model(recipe: Recipe, home: str | None = None) -> str:
    """Build (or reuse) the exported model and copy it into export_dir; returns that folder."""
    store = ArtifactStore(home)
    plan = plan_export(recipe, store)
    tags = {"tunefactory.flow": "export", "store": str(store.root)}
    parent = tracking.start_parent(recipe.training.run_name, recipe.flat(), tags, experiment_for(recipe, None))
    stage_runs = {step.label: tracking.start_stage(parent, step.label, {"stage": step.stage.name}) for step in plan}
    try:
        results = collect(plan, submit_all(plan, store, stage_runs), store, stage_runs)
        exported = store.lookup("export", next(r.key for r in results if r.stage == "export"))
        target = Path(recipe.export.export_dir)
        write_into(exported.part("model"), target, exported.ref.id, "export_dir")
    except BaseException as exc:
        tracking.finish(parent, ok=False, interrupted=not isinstance(exc, Exception))
        raise
    tracking.finish(parent, ok=True)
    return str(target.resolve())
