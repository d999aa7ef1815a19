"""The data-preview flow: run (or reuse) only the data stages and the model stage (for its tokenizer)."""

from __future__ import annotations

from prefect import flow

from flows.finetune import collect, experiment_for, stage_runner, submit_all
from flows.plan import DATA_STAGES, Plan, plan_run
from tasks.core import tracking
from tasks.core.recipe import Recipe
from tasks.core.store import ArtifactStore
from tasks.data_report import shuffled_padding_share
from tasks.rows import load_rows


@flow(name="data-preview", task_runner=stage_runner())  # Prefect's default runs every stage at once
def data_preview(recipe: Recipe, home: str | None = None) -> str:
    """Tokenize the recipe's data and return the preview (decoded samples, length statistics) with the
    padding share the recipe's batch size would give."""
    store = ArtifactStore(home)
    full = plan_run(recipe, store)
    plan = Plan(tuple(s for s in full if s.stage.name in DATA_STAGES | {"model"}))
    tags = {"tunefactory.flow": "data-preview", "store": str(store.root)}
    parent = tracking.start_parent(recipe.training.run_name, {"template": recipe.data.template}, tags,
                                   experiment_for(recipe, None))
    stage_runs = {step.label: tracking.start_stage(parent, step.label, {"stage": step.stage.name}) for step in plan}
    try:
        results = collect(plan, submit_all(plan, store, stage_runs), store, stage_runs)
    except BaseException as exc:
        tracking.finish(parent, ok=False, interrupted=not isinstance(exc, Exception))
        raise
    tracking.finish(parent, ok=True)
    tokenized = store.lookup("tokenize", next(r.key for r in results if r.stage == "tokenize"))
    if not tokenized.has("preview"):
        return "(no training data to preview)"
    preview = tokenized.part("preview").read_text()
    if tokenized.info.get("train") == "rows" and tokenized.info.get("train_format") == "supervised":
        batch, seed = recipe.training.per_device_train_batch_size, recipe.training.seed
        lengths = [len(ids) for ids in load_rows(tokenized.part("train"))["input_ids"]]
        share = shuffled_padding_share(lengths, batch, seed)
        preview += f"\npadding_share at per_device_train_batch_size {batch}: {share:.4f}\n"
    return preview
