import pytest
from pydantic import ValidationError

from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe, load_recipe, parse_override

LLAMAFACTORY_SFT_LORA = {  # LlamaFactory's examples/train_lora/llama3_lora_sft.yaml, keys and values as shipped
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
    "trust_remote_code": True,
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_rank": 8,
    "lora_target": "all",
    "dataset": "identity,alpaca_en_demo",
    "template": "llama3",
    "cutoff_len": 2048,
    "max_samples": 1000,
    "overwrite_cache": True,
    "preprocessing_num_workers": 16,
    "dataloader_num_workers": 4,
    "output_dir": "saves/llama3-8b/lora/sft",
    "logging_steps": 10,
    "save_steps": 500,
    "plot_loss": True,
    "overwrite_output_dir": True,
    "save_only_model": False,
    "report_to": "none",
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 1.0e-4,
    "num_train_epochs": 3.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "bf16": True,
    "ddp_timeout": 180000000,
    "resume_from_checkpoint": None,
}


def test_llamafactory_example_keys_are_accepted():
    recipe = Recipe.from_flat(LLAMAFACTORY_SFT_LORA)
    assert recipe.finetuning.lora_rank == 8
    assert recipe.training.gradient_accumulation_steps == 8
    assert recipe.data.dataset == "identity,alpaca_en_demo"


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("dataset: x\nlora_rnak: 8\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key 'lora_rnak'; did you mean 'lora_rank'\?"):
        load_recipe(path)


def test_wrong_type_names_the_key():
    with pytest.raises(RecipeError, match=r"key 'lora_rank'.*integer.*'eight'"):
        Recipe.from_flat({"dataset": "x", "lora_rank": "eight"})


def test_conflicting_options_name_both_keys():
    with pytest.raises(RecipeError, match="'bf16' and 'fp16'"):
        Recipe.from_flat({"dataset": "x", "bf16": True, "fp16": True})


def test_recipe_is_immutable():
    recipe = Recipe.from_flat({"dataset": "x"})
    with pytest.raises(ValidationError, match="frozen"):
        recipe.finetuning.lora_rank = 4


def test_overrides_are_parsed_as_yaml(tmp_path):
    assert parse_override("do_sample=false") == ("do_sample", False)
    assert parse_override("lora_target=q_proj,v_proj") == ("lora_target", "q_proj,v_proj")
    path = tmp_path / "r.yaml"
    path.write_text("dataset: x\n")
    recipe = load_recipe(path, ["lora_rank=32", "learning_rate=1e-4"])
    assert recipe.finetuning.lora_rank == 32 and recipe.training.learning_rate == 1e-4
    with pytest.raises(RecipeError, match="expected key=value"):
        parse_override("lora_rank")
