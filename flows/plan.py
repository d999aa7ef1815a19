"""Plan a run: every stage's spec and key, computed from the recipe and input keys alone.

Keys depend only on the recipe, the source digests and the keys of upstream stages, so the whole
DAG is known before anything builds; that is what `--dry-run` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import align, evaluate, fetch, merge, model, tokenize, train
from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tasks.core.registry import resolve_datasets
from tasks.core.store import StageSpec

DATA_STAGES = {"fetch", "align", "tokenize"}
TASKS: dict[str, Any] = {
    "fetch": fetch.fetch_task,
    "align": align.align_task,
    "tokenize": tokenize.tokenize_task,
    "model": model.model_task,
    "train": train.train_task,
    "merge": merge.merge_task,
    "evaluate": evaluate.evaluate_task,
}


@dataclass(frozen=True)
class Step:
    spec: StageSpec
    force: bool = False  # rebuild even if a valid artifact exists (overwrite_cache on data stages)

    @property
    def task(self):
        return TASKS[self.spec.stage]


def plan_run(recipe: Recipe) -> list[Step]:
    """The ordered stages of a fine-tune: data, model, train, merge, then evaluate base and tuned."""
    data = recipe.data
    specs: list[StageSpec] = []

    def aligned_specs(names: str | None, key: str) -> list[StageSpec]:
        out = []
        for entry in resolve_datasets(names, data.dataset_dir, key):
            if entry.ranking or "kto_tag" in entry.columns:
                kind = "preference (ranking)" if entry.ranking else "KTO"
                raise RecipeError(f"key '{key}': dataset '{entry.name}' holds {kind} data, which stage "
                                  f"{recipe.finetuning.stage} cannot train on")
            fetched = fetch.plan(entry, recipe)
            out.append(align.plan(entry, fetched, recipe))
            specs.extend([fetched, out[-1]])
        return out

    train_data = aligned_specs(data.dataset, "dataset")
    eval_data = aligned_specs(data.eval_dataset, "eval_dataset")
    base = model.plan(recipe)
    specs.append(base)
    has_eval = bool(eval_data) or data.val_size > 0
    if not (train_data or has_eval):
        raise RecipeError("nothing to do: set 'dataset' to train, or 'eval_dataset' / 'val_size' to evaluate")
    tokenized = tokenize.plan(recipe, train_data, eval_data, base)
    specs.append(tokenized)
    scored = {"base": base}
    if recipe.finetuning.do_train:
        trained = train.plan(recipe, tokenized, base)
        merged = merge.plan(recipe, base, trained)
        specs += [trained, merged]
        scored["tuned"] = merged
    if recipe.evaluation.do_eval and has_eval:
        specs += [evaluate.plan(recipe, tokenized, target, role) for role, target in scored.items()]
    check_export_dirs(recipe)
    force = recipe.data.overwrite_cache
    return [Step(spec, force=force and spec.stage in DATA_STAGES) for spec in specs]


MARKER = "tunefactory.json"


def check_export_dirs(recipe: Recipe) -> None:
    """output_dir / export_dir may be written only if empty, ours from an earlier run, or overwrite is on."""
    for key, value in (("output_dir", recipe.training.output_dir), ("export_dir", recipe.export.export_dir)):
        path = Path(value) if value else None
        if (
            path
            and path.is_dir()
            and any(path.iterdir())
            and not (path / MARKER).exists()
            and not recipe.training.overwrite_output_dir
        ):
            raise RecipeError(f"key '{key}': {path} already holds files; empty it or set overwrite_output_dir: true")
