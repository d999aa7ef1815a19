"""Derived settings: what the recipe asks for, resolved against the hardware that runs it."""

from __future__ import annotations

import importlib.util

import torch

from tasks.core.errors import RecipeError


def has_cuda() -> bool:
    return torch.cuda.is_available()


def storage_dtype(infer_dtype: str) -> str:
    """Dtype the base checkpoint is saved in: bf16/fp16 on GPUs that compute them fast, else fp32."""
    if infer_dtype != "auto":
        return infer_dtype
    if has_cuda():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def mixed_precision(bf16: bool, fp16: bool) -> str:
    """The training precision actually used: half precision only where a GPU supports it."""
    if bf16 and has_cuda() and torch.cuda.is_bf16_supported():
        return "bf16"
    if (fp16 or bf16) and has_cuda():
        return "fp16"
    return "fp32"  # CPU: half-precision autocast is slower than fp32 here and changes results


def attn_implementation(flash_attn: str) -> str:
    """transformers' attn_implementation for the recipe's `flash_attn` choice."""
    if flash_attn in ("auto", "sdpa"):
        return "sdpa"
    if flash_attn == "disabled":
        return "eager"
    if not (has_cuda() and importlib.util.find_spec("flash_attn")):
        raise RecipeError("key 'flash_attn': fa2 needs a CUDA GPU and the flash-attn package; use sdpa")
    return "flash_attention_2"


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
