"""How a model is quantized with bitsandbytes (QLoRA, a quantized reference or reward model): the settings as a
typed part of a stage's config, and the from_pretrained keywords they give. Apart from tasks.train_methods so that
the quantize stage's key covers only this, not every training method."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.core.hardware import quantized_placement, torch_dtype


class QuantSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    bits: int
    type: str | None  # 4-bit only
    double: bool | None  # 4-bit only

    @classmethod
    def of(cls, bits: int | None, model) -> QuantSettings | None:
        """`bits` with the recipe's quantization_type and double_quantization (model: its model section), for the
        trained model and, as LlamaFactory copies them, for the reference and reward models."""
        if not bits:
            return None
        four = bits == 4
        return cls(bits=bits, type=model.quantization_type if four else None,
                   double=model.double_quantization if four else None)


COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "pure_bf16": "bfloat16", "fp16": "float16"}  # LlamaFactory's


def quantization_config(quant: QuantSettings | None, precision: str):
    """bitsandbytes settings; 4-bit layers compute in the training precision (fp16 included, as LlamaFactory's)."""
    if quant is None:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double,
        bnb_4bit_compute_dtype=torch_dtype(COMPUTE_DTYPES[precision]),
    )


def quantized_loading(quant: QuantSettings | None, precision: str) -> dict[str, Any]:
    """from_pretrained's keywords to load a model in 4 or 8 bit on this process's device; none without quant."""
    if quant is None:
        return {}
    return {"quantization_config": quantization_config(quant, precision), **quantized_placement()}
