"""The data-preview flow: run (or reuse) only the data stages and the model stage (for its tokenizer)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.finetune import run_step, runtime_for
from flows.plan import DATA_STAGES, plan_run
from tasks.core import tracking
from tasks.core.recipe import Recipe
from tasks.core.store import ArtifactStore


@flow(name="data-preview")
def data_preview(recipe: Recipe, home: str | None = None) -> str:
    """Tokenize the recipe's data and return the preview (decoded samples, length statistics)."""
    store = ArtifactStore(home)
    steps = [s for s in plan_run(recipe) if s.spec.stage in DATA_STAGES | {"model"}]
    parent = tracking.start_parent(recipe.training.run_name, recipe.slice_for("tokenize"), {"flow": "data-preview"})
    runtime = runtime_for(recipe, store.root)
    try:
        for step in steps:
            run_step(step, store, runtime, parent)
    except BaseException:
        tracking.finish(parent, ok=False)
        raise
    tracking.finish(parent, ok=True)
    tokenized = next(s.spec for s in steps if s.spec.stage == "tokenize")
    preview = Path(store.path(tokenized.stage, tokenized.key)) / "preview.md"
    return preview.read_text() if preview.exists() else "(no training data to preview)"
