"""The flow's parameter is the typed recipe, so Prefect's UI renders it as a form."""

from prefect.utilities.callables import parameter_schema

from flows.finetune import finetune
from flows.retune import retune


def test_finetune_parameters_are_the_typed_recipe():
    schema = parameter_schema(finetune).model_dump()
    assert set(schema["properties"]) == {"recipe", "overrides", "home", "experiment", "deliver"}
    definitions = schema["definitions"]
    finetuning = definitions["FinetuningSection"]["properties"]
    assert finetuning["lora_rank"]["type"] == "integer" and finetuning["lora_rank"]["default"] == 8
    assert finetuning["lora_rank"]["description"] == "LoRA rank."
    assert finetuning["finetuning_type"]["enum"] == ["lora", "full", "freeze"]
    assert {"ModelSection", "DataSection", "TrainingSection", "EvaluationSection", "ExportSection"} <= set(definitions)


def test_retune_parameters_are_the_recipe_and_the_decision_rule():
    schema = parameter_schema(retune).model_dump()
    assert set(schema["properties"]) == {"recipe", "model_name", "metric", "margin", "overrides", "home", "experiment"}
    assert schema["required"] == ["recipe", "model_name"]


def test_a_recipe_from_the_form_gets_every_check_before_anything_runs(workdir):
    """A recipe built from the flow's parameters (the Prefect UI form, `prefect deployment run --param`) was only
    validated field by field: combinations and names went unchecked and failed mid-run, after publishing stages."""
    from tasks.core.recipe import Recipe

    form = Recipe.model_validate({"training": {"lr_scheduler_type": "cosin"}, "data": {"dataset": "pydoc_summaries"}})
    for flow in (finetune.fn, lambda recipe: retune.fn(recipe, model_name="m")):
        state = flow(form)
        assert state.is_failed() and "flow parameter 'recipe'" in state.message, state.message
        assert "did you mean 'cosine'" in state.message
    assert not (workdir / "artifacts").exists()  # nothing was built
