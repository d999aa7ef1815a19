"""Scheduled re-tuning against a real MLflow SQLite registry, on the tiny model."""

import json
import shutil

import mlflow
import pytest
from transformers import AutoModelForCausalLM

from flows.retune import retune
from tasks.core import model_registry
from tasks.core.errors import RecipeError
from tasks.core.recipe import load_recipe
from tests.conftest import BUNDLED_DATA


def test_retune_promotes_skips_retrains_and_rejects(write_recipe, workdir):
    data = workdir / "data"
    data.mkdir()
    shutil.copy(BUNDLED_DATA / "pydoc_summaries_train.jsonl", data / "mine.jsonl")
    (data / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))
    recipe = load_recipe(write_recipe(dataset="mine", dataset_dir=str(data), max_samples=None, max_steps=6,
                                      cutoff_len=64, max_new_tokens=2, eval_dataset="pydoc_summaries_test",
                                      output_dir=str(workdir / "served")))
    served = workdir / "served" / "adapter_model.safetensors"

    def run(**overrides):
        return retune(recipe, model_name="tiny", metric="eval_loss", overrides=overrides or None)

    first = run()
    assert first.decision == "promoted" and first.reason == "no champion yet"
    champion = model_registry.champion("tiny")
    assert str(champion.version) == first.challenger_version

    second = run()
    assert second.decision == "skipped" and "unchanged" in second.reason and second.challenger_version is None

    with (data / "mine.jsonl").open("a") as rows:  # new data arrives
        row = {"instruction": "Summarize.", "input": "def f(): pass", "output": "Do nothing."}
        rows.write(json.dumps(row) + "\n")
    third = run()
    assert third.decision in ("promoted", "rejected")  # trained again, and judged against the champion
    assert third.challenger_version not in (None, first.challenger_version)
    assert third.champion_score is not None and third.champion_version == first.challenger_version

    held, champion_adapter = str(model_registry.champion("tiny").version), served.read_bytes()
    worse = run(learning_rate=1e-9)  # hardly trained: its eval_loss cannot beat a trained champion
    assert worse.decision == "rejected" and worse.challenger_score > worse.champion_score
    assert str(model_registry.champion("tiny").version) == held  # the alias stays
    assert served.read_bytes() == champion_adapter  # and output_dir keeps the champion's adapter

    decisions = mlflow.tracking.MlflowClient().search_runs(
        [mlflow.tracking.MlflowClient().get_experiment_by_name("tunefactory-retune").experiment_id])
    assert sorted(r.data.tags["decision"] for r in decisions) == sorted(
        d.decision for d in (first, second, third, worse))

    folder = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny@champion", dst_path=str(workdir / "dl"))
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers loads the champion
    assert model.config.num_hidden_layers == 2

    versions = len(mlflow.tracking.MlflowClient().search_model_versions("name = 'tiny'"))
    shutil.rmtree(workdir / "artifacts" / "merge")  # the champion can no longer be scored in this store
    with pytest.raises(RecipeError, match="its merged model .* is not in the store"):
        run(learning_rate=2e-3)
    assert len(mlflow.tracking.MlflowClient().search_model_versions("name = 'tiny'")) == versions  # none undecided


def test_retraining_the_champion_itself_registers_nothing(write_recipe, workdir):
    """A changed margin changes the fingerprint but not the model: it was registered again and rejected as a tie."""
    recipe = load_recipe(write_recipe(max_samples=8, max_steps=2, max_new_tokens=2))
    first = retune(recipe, model_name="same", metric="eval_loss")
    again = retune(recipe, model_name="same", metric="eval_loss", margin=0.5)
    assert first.decision == "promoted" and again.decision == "skipped" and "the champion itself" in again.reason
    assert len(mlflow.tracking.MlflowClient().search_model_versions("name = 'same'")) == 1


def test_a_chained_recipes_champion_is_scored_on_the_challengers_data(write_recipe, workdir):
    """A dpo recipe on an sft recipe plans sft's tokenize first: the champion was scored on sft's held-out rows
    while the challenger was scored on dpo's."""
    sft = write_recipe("sft.yaml", max_samples=12, max_steps=2, max_new_tokens=2, eval_dataset=None, val_size=4)
    dpo = load_recipe(write_recipe("dpo.yaml", stage="dpo", dataset="pydoc_preferences", max_samples=8, max_steps=2,
                                   eval_dataset="pydoc_preferences_test", adapter_name_or_path=str(sft)))
    first = retune(dpo, model_name="dpo", metric="eval_loss")
    second = retune(dpo, model_name="dpo", metric="eval_loss", overrides={"pref_beta": 0.2})
    assert first.decision == "promoted" and second.decision in ("promoted", "rejected")
    assert second.champion_score == first.challenger_score  # the same model on the same rows


def test_retune_refuses_what_it_cannot_register_or_score_before_training(write_recipe, workdir):
    """A reward model (no merged model) or a generation metric the recipe does not compute failed after training,
    with a traceback, leaving a registered version without a decision."""
    from flows.retune import decide
    from tasks.core.errors import RecipeError
    from tasks.core.store import ArtifactStore

    reward = load_recipe(write_recipe("rm.yaml", stage="rm", dataset="pydoc_preferences",
                                      eval_dataset="pydoc_preferences_test"))
    with pytest.raises(RecipeError, match="stage rm trains a reward model"):
        decide(reward, "tiny-rm", "eval_loss", 0.0, ArtifactStore(), None)
    plain = load_recipe(write_recipe(do_predict=False))
    with pytest.raises(RecipeError, match="retune metric 'rougeL' scores generated replies"):
        decide(plain, "tiny-np", "rougeL", 0.0, ArtifactStore(), None)
    assert not (workdir / "artifacts").exists()  # refused before anything was built


def test_a_tie_is_no_improvement_and_the_decision_rule_is_part_of_the_fingerprint(write_recipe):
    """With margin 0 a tie promoted the challenger; a changed --metric or code was 'unchanged' and skipped."""
    from flows.plan import plan_run
    from flows.retune import better, fingerprint

    assert not better(0.5, 0.5, "rougeL", 0.0) and not better(1.2, 1.2, "eval_loss", 0.0)
    assert better(0.6, 0.5, "rougeL", 0.0) and better(1.1, 1.2, "eval_loss", 0.05)
    plan = plan_run(load_recipe(write_recipe()))
    assert fingerprint(plan, "rougeL", 0.0) != fingerprint(plan, "eval_loss", 0.0)
    assert fingerprint(plan, "rougeL", 0.0) != fingerprint(plan, "rougeL", 0.1)


def test_the_registered_recipe_tag_is_whole_json():
    """It was cut at 5,000 characters, past which it was no longer JSON."""
    from flows.retune import recipe_tag
    from tasks.core.recipe import Recipe

    recipe = Recipe.from_flat({"dataset": "pydoc_summaries", "default_system": "Be brief. " * 700})
    assert json.loads(recipe_tag(recipe, "run1"))["data"]["default_system"] == "Be brief. " * 700
    huge = recipe.replace(default_system="x" * 200_000)
    assert recipe_tag(huge, "run1") == "too long for a tag: see the params of MLflow run run1"
