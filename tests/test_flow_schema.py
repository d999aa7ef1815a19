"""The flow's parameter is the typed recipe, so Prefect's UI renders it as a form."""

from prefect.utilities.callables import parameter_schema

from flows.finetune import finetune


def test_finetune_parameters_are_the_typed_recipe():
    schema = parameter_schema(finetune).model_dump()
    assert set(schema["properties"]) == {"recipe", "home"}
    definitions = schema["definitions"]
    finetuning = definitions["FinetuningSection"]["properties"]
    assert finetuning["lora_rank"]["type"] == "integer" and finetuning["lora_rank"]["default"] == 8
    assert finetuning["lora_rank"]["description"] == "LoRA rank."
    assert finetuning["finetuning_type"]["enum"] == ["lora", "full", "freeze"]
    assert {"ModelSection", "DataSection", "TrainingSection", "EvaluationSection", "ExportSection"} <= set(definitions)
