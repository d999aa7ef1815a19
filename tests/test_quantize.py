"""QLoRA's quantize stage: the bitsandbytes checkpoint is cached beside the full-precision import,
training loads it directly and merge folds the adapter into the import; models that ship quantized
(GPTQ, AWQ, ...) train with adapters only."""

from __future__ import annotations

import json
import shutil

import pytest

from flows.plan import plan_run
from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tests.conftest import tiny_recipe_values


def test_qlora_trains_on_the_quantized_checkpoint_and_merges_into_the_import(tiny_model_dir):
    steps = {s.label: s for s in plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, quantization_bit=4)))}
    assert steps["quantize"].inputs == {"model": "model"}
    assert steps["train"].inputs["model"] == "quantize" and steps["merge"].inputs["model"] == "model"
    assert steps["evaluate[base]"].inputs["model"] == "model"
    plain = {s.label for s in plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir)))}
    assert "quantize" not in plain


def test_the_quantize_stage_writes_a_4bit_checkpoint(write_recipe, workdir):
    from transformers import AutoModelForCausalLM

    from flows.finetune import finetune
    from tasks.core.recipe import load_recipe
    from tasks.core.store import ArtifactStore

    summary = finetune(load_recipe(write_recipe(quantization_bit=4, do_eval=False, max_samples=8)))
    store = ArtifactStore(str(workdir / "artifacts"))
    key = {s.label: s.key for s in summary.stages}
    quantized = store.lookup("quantize", key["quantize"])
    config = json.loads((quantized.part("model") / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and quantized.info["quantization"]["bits"] == 4
    model = AutoModelForCausalLM.from_pretrained(quantized.part("model"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    merged = json.loads((store.lookup("merge", key["merge"]).part("model") / "config.json").read_text())
    assert "quantization_config" not in merged  # merged into the full-precision import
    again = finetune(load_recipe(write_recipe(quantization_bit=4, do_eval=False, max_samples=8)))
    assert all(s.cached for s in again.stages)


@pytest.fixture
def gptq_model(tiny_model_dir, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_prequantized_model_trains_with_adapters_only(gptq_model):
    with pytest.raises(RecipeError, match=r"'finetuning_type': the model is already quantized \(gptq\)"):
        plan_run(Recipe.from_flat(tiny_recipe_values(gptq_model, finetuning_type="full")))
    with pytest.raises(RecipeError, match=r"'quantization_bit': the model is already quantized \(gptq\)"):
        plan_run(Recipe.from_flat(tiny_recipe_values(gptq_model, quantization_bit=4)))
    # PEFT cannot merge into GPTQ/AWQ weights: the base is scored, the adapter served on it, nothing merged.
    labels = {s.label for s in plan_run(Recipe.from_flat(tiny_recipe_values(gptq_model)))}
    assert "train" in labels and "evaluate[base]" in labels and not labels & {"merge", "evaluate[tuned]"}
    for keys, message in (({"export_dir": "out"}, "key 'export_dir': the model is already quantized \\(gptq\\)"),
                          ({"create_new_adapter": True, "adapter_name_or_path": "a"}, "key 'create_new_adapter'"),
                          ({"do_train": False, "adapter_name_or_path": "a"}, "key 'adapter_name_or_path'")):
        with pytest.raises(RecipeError, match=message):
            plan_run(Recipe.from_flat(tiny_recipe_values(gptq_model, **keys)))


def test_4bit_layers_compute_in_the_training_precision(tiny_model_dir):
    """fp16 and pure_bf16 runs computed their 4-bit layers in fp32 (LlamaFactory: the training's half precision),
    and the quantize key left out the module that builds the config, so a fix there reused stale checkpoints."""
    import torch

    from tasks import quantize
    from tasks.core.hashing import module_sources
    from tasks.quantization import QuantSettings, quantization_config

    four = QuantSettings(bits=4, type="nf4", double=True)
    dtypes = {p: quantization_config(four, p).bnb_4bit_compute_dtype for p in ("fp32", "bf16", "pure_bf16", "fp16")}
    assert dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
                      "fp16": torch.float16}
    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, quantization_bit=4, pure_bf16=True))
    assert next(s for s in plan_run(recipe) if s.label == "quantize").config.compute_dtype == "pure_bf16"
    keyed = {path.name for path in module_sources(quantize.STAGE.code)}
    assert "quantization.py" in keyed and "train_methods.py" not in keyed  # the bitsandbytes config, not every method


@pytest.mark.parametrize("upcast_layernorm", [False, True])
def test_qlora_leaves_the_unquantized_weights_in_the_models_dtype(tiny_model_dir, upcast_layernorm):
    """As LlamaFactory, which never calls PEFT's prepare_model_for_kbit_training: that cast every embedding, head and
    norm to fp32 (about 1 GB more for Llama-3-8B's 128k vocabulary) and made upcast_layernorm: false meaningless."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.train import training_values
    from tasks.train_common import TrainingConfig
    from tasks.train_methods import attach_trainable, load_base

    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, quantization_bit=4, bf16=True,
                                                 upcast_layernorm=upcast_layernorm))
    config = TrainingConfig(**{**training_values(recipe), "precision": "bf16"})  # as on a CPU or GPU with bf16
    bf16_copy = tiny_model_dir.parent / f"tiny-bf16-{upcast_layernorm}"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16_copy)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(bf16_copy)
    model = attach_trainable(load_base(bf16_copy, config), config)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.bfloat16
    norm = torch.float32 if upcast_layernorm else torch.bfloat16
    assert dtypes["base_model.model.model.norm.weight"] == norm
    assert dtypes["base_model.model.model.layers.0.input_layernorm.weight"] == norm
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapters
