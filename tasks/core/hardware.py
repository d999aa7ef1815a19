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


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 dot-product instructions (AVX512-BF16 or AMX), where a bf16 matmul runs
    several times faster than fp32 (bench/mfu.py prints both); elsewhere bf16 is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def mixed_precision(bf16: bool, fp16: bool) -> str:
    """The training precision actually used: half precision only where the hardware computes it natively.
    A CPU runs `bf16: true` as bf16 autocast when it has bf16 instructions; fp16 on a CPU trains in fp32."""
    if has_cuda():
        if bf16 and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if fp16 or bf16 else "fp32"
    return "bf16" if bf16 and cpu_has_native_bf16() else "fp32"


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
