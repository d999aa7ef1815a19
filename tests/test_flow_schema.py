"""The flow's parameter is the typed recipe, so Prefect's UI renders it as a form."""

from prefect.utilities.callables import parameter_schema

from flows.finetune import finetune
from flows.retune import retune


def test_finetune_parameters_are_the_typed_recipe():
    schema = parameter_schema(finetune).model_dump()
    assert set(schema["properties"]) == {"recipe", "overrides", "home", "experiment"}
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
