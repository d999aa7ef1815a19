"""The model `tunefactory chat` and `tunefactory api` serve: a recipe's trained model (its base and adapter,
built or reused through the store, never merged), or a model folder."""

from __future__ import annotations

from pathlib import Path

from flows.chaining import is_own_trainer
from flows.plan import plan_run
from flows.sources import source_recipe
from tasks.core.errors import RecipeError
from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tasks.inference import ChatEngine, Generation, check_backend, load_engine
from tasks.templates.choice import TemplateChoice


def trained_model(source: Path, recipe, home: str | None) -> tuple[Path, Path | None]:
    """(model folder, adapter folder or None) of a recipe's trained model, built now if the store lacks it."""
    store = ArtifactStore(home)
    plan = plan_run(recipe, store)
    trainer = next((s for s in plan if is_own_trainer(s.stage.name, s.label)), None)
    if trainer is not None and trainer.stage.name == "reward":
        raise RecipeError(f"{source}: a reward model (stage rm) scores replies; it does not chat")
    # The merged model where base + one adapter is not the model: create_new_adapter (the trained adapter sits on
    # the base merged with another one), or nothing trained and adapter_name_or_path named.
    stacked = next((s for s in plan.of_stage("merge") if "start" in s.inputs or trainer is None), None)
    if stacked is not None:
        refs = run_in_process(plan.upstream_of(stacked.label).steps, store.root)
        return store.lookup("merge", refs[stacked.label].key).part("model"), None
    refs = run_in_process(plan.upstream_of(trainer.label if trainer else "model").steps, store.root)
    model_dir = store.lookup("model", refs["model"].key).part("model")
    if trainer is None:
        return model_dir, None
    trained = store.lookup(trainer.stage.name, refs[trainer.label].key)
    if trained.has("adapter"):
        return model_dir, trained.part("adapter")
    return trained.part("model"), None


def engine_for(source: str, overrides: list[str], home: str | None, template: str | None = None,
               adapter: str | None = None) -> ChatEngine:
    """A chat engine for a recipe file or a model folder; --template and --adapter replace the recipe's."""
    path = Path(source)
    recipe = source_recipe(source, overrides)
    check_backend(recipe.model.infer_backend)  # before anything is built
    if path.is_file():
        model_dir, adapter_dir = trained_model(path, recipe, home)
    else:
        model_dir, adapter_dir = path, None
    if adapter:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise RecipeError(f"--adapter {adapter}: no adapter_config.json there (not a PEFT adapter folder)")
    name = path.stem if path.is_file() else path.name
    choice = TemplateChoice.of(recipe.data, name=template)  # the recipe's template options apply to --template too
    generation = Generation(top_k=recipe.evaluation.top_k, repetition_penalty=recipe.evaluation.repetition_penalty)
    return load_engine(recipe.model.infer_backend, model_dir, choice, adapter_dir, name,
                       recipe.model.trust_remote_code, generation)
