"""Quantize stage (QLoRA): the imported base checkpoint, quantized with bitsandbytes to 4 or 8 bit and
saved, so training loads it directly instead of quantizing the full-precision import on every run.
The full-precision import stays the model artifact that merge folds the adapter into.

Models that ship already quantized (GPTQ, AWQ, AQLM, HQQ, ...: a quantization_config in their
config.json) are not quantized again; they train with adapters only (see `check_prequantized`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.errors import RecipeError
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, StageConfig, Step
from tasks.quantization import QuantSettings, quantization_config


class QuantizeConfig(StageConfig):
    quantization: QuantSettings
    compute_dtype: str  # the dtype 4-bit layers compute in: what training runs in


def plan(recipe: Recipe, model: Step, compute: str) -> Step:
    """The quantize step on the imported model; compute is the training precision (fp32, bf16, fp16, pure_bf16)."""
    settings = QuantSettings.of(recipe.model.quantization_bit, recipe.model)
    four = settings.bits == 4
    return STAGE.step("quantize", QuantizeConfig(quantization=settings, compute_dtype=compute if four else "-"),
                      {"model": model})


def prequantized(config: dict[str, Any]) -> str | None:
    """The quantization method a model's config.json declares (gptq, awq, aqlm, hqq, bitsandbytes...), if any."""
    quant = config.get("quantization_config")
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else None


def check_prequantized(method: str | None, finetuning_type: str, quantization_bit: int | None) -> None:
    """An already-quantized model trains with adapters only, and is not quantized again."""
    if method is None:
        return
    if finetuning_type != "lora":
        raise RecipeError(f"key 'finetuning_type': the model is already quantized ({method}); only finetuning_type: "
                          "lora can train it (adapters on the quantized weights)")
    if quantization_bit:
        raise RecipeError(f"key 'quantization_bit': the model is already quantized ({method}); remove "
                          "quantization_bit")


def build(config: QuantizeConfig, ctx: BuildContext, out: Path) -> Built:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = ctx.inputs["model"]
    check_prequantized(imported.info.get("prequantized"), "lora", config.quantization.bits)  # a hub model
    source, remote = imported.part("model"), remote_code(imported)
    quant = quantization_config(config.quantization, config.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(source), quantization_config=quant, **remote)
    model.name_or_path = model.config._name_or_path = ""  # the store path must not enter the saved bytes
    model.save_pretrained(str(out / "model"))
    AutoTokenizer.from_pretrained(str(source), **remote).save_pretrained(str(out / "model"))
    ctx.log.info("quantized to %d bit", config.quantization.bits)
    info = {**imported.info, "quantization": config.quantization.model_dump()}
    return Built("quantized_model", {"model": "model"}, info)


STAGE = Stage(
    name="quantize",
    plan=plan,
    build=build,
    code=("tasks.quantize", "tasks.quantization"),
    libraries=("torch", "transformers", "bitsandbytes", "safetensors"),
    heavy=True,
)
