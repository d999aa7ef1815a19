"""Derived settings: what the recipe asks for, resolved against the hardware that runs it."""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from typing import TYPE_CHECKING, Any

from tasks.core.errors import RecipeError

if TYPE_CHECKING:
    import torch

# Device nodes a CUDA (or ROCm) device is reached through on Linux: NVIDIA's driver (nvidia0, nvidiactl), Jetson's
# (nvhost-*, nvmap, nvgpu), ROCm's (kfd) and WSL2's GPU paravirtualisation (dxg).
GPU_DEVICE_NODE_PREFIXES = ("nvidia", "nvhost", "nvmap", "nvgpu", "kfd", "dxg")
# /proc/cpuinfo flags of the bfloat16 dot-product instructions that torch's own CPU probes look for.
NATIVE_BF16_CPU_FLAGS = {"avx512_bf16", "amx_tile"}


def has_gpu_device_node() -> bool:
    """Whether /dev holds a node a GPU driver made (True where /dev cannot be read)."""
    try:
        return any(name.startswith(GPU_DEVICE_NODE_PREFIXES) for name in os.listdir("/dev"))
    except OSError:
        return True  # cannot tell: ask torch


def has_cuda() -> bool:
    """Whether torch sees a CUDA (or ROCm) device. On Linux with no GPU device node there is none to see, and
    the answer comes without importing torch: planning resolves the recipe's precision through here, and
    torch's import was 2 of a no-op re-run's 10 s on the 2-core machine."""
    if sys.platform == "linux" and not has_gpu_device_node():
        return False
    import torch

    return torch.cuda.is_available()


def cuda_has_bf16() -> bool:
    """Whether the CUDA device computes bfloat16 (Ampere and newer); ask only where has_cuda() is true."""
    import torch

    return torch.cuda.is_bf16_supported()


def storage_dtype(infer_dtype: str) -> str:
    """Dtype the base checkpoint is saved in: bf16/fp16 on GPUs that compute them fast, else fp32."""
    if infer_dtype != "auto":
        return infer_dtype
    if has_cuda():
        return "bfloat16" if cuda_has_bf16() else "float16"
    return "float32"


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bfloat16 dot-product instructions (AVX512-BF16 or AMX), where a bf16 matmul runs
    several times faster than fp32 (bench/mfu.py prints both); elsewhere bf16 is emulated and slower.

    On Linux the kernel's CPU flags answer (they are what torch's probes read, less the XSAVE states the
    kernel did not enable, which it clears from the flags), so planning need not import torch; one answer for
    the whole process, so a plan and the stage that builds it agree."""
    flags = linux_cpu_flags()
    if flags is not None:
        return bool(flags & NATIVE_BF16_CPU_FLAGS)
    return torch_says_cpu_has_native_bf16()


@cache
def linux_cpu_flags() -> frozenset[str] | None:
    """The first CPU's feature flags from /proc/cpuinfo; None where there is no such file (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def torch_says_cpu_has_native_bf16() -> bool:
    """torch's own answer to cpu_has_native_bf16 (it imports torch)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def mixed_precision(bf16: bool, fp16: bool) -> str:
    """The training precision actually used: half precision only where the hardware computes it natively.
    A CPU runs `bf16: true` as bf16 autocast when it has bf16 instructions; fp16 on a CPU trains in fp32."""
    if has_cuda():
        if bf16 and cuda_has_bf16():
            return "bf16"
        return "fp16" if fp16 or bf16 else "fp32"
    return "bf16" if bf16 and cpu_has_native_bf16() else "fp32"


def training_precision(pure_bf16: bool, bf16: bool, fp16: bool) -> str:
    """The training precision: pure_bf16 (bf16 weights, no autocast; CPUs compute bf16 too) or mixed_precision."""
    if pure_bf16:
        if has_cuda() and not cuda_has_bf16():
            raise RecipeError("key 'pure_bf16': this GPU has no bfloat16; use fp16 mixed precision")
        return "pure_bf16"
    return mixed_precision(bf16, fp16)


def attn_implementation(flash_attn: str) -> str | None:
    """transformers' attn_implementation for the recipe's `flash_attn` choice; None for auto, where transformers
    chooses as LlamaFactory leaves it to: SDPA where the model class supports it, else eager (Gemma2 and
    GraniteSWA refuse SDPA)."""
    if flash_attn == "auto":
        return None
    if flash_attn == "sdpa":
        return "sdpa"
    if flash_attn == "disabled":
        return "eager"
    if not (has_cuda() and importlib.util.find_spec("flash_attn")):
        raise RecipeError("key 'flash_attn': fa2 needs a CUDA GPU and the flash-attn package; use sdpa")
    return "flash_attention_2"


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def compute_device() -> str:
    """Where this process computes: its rank's CUDA device (LOCAL_RANK under torchrun, else the current one)
    where torch sees one, else the CPU. The stages that run their own forward passes (evaluate, exam, ppo,
    chat and the API) put the model there; the Trainer-run stages leave that to accelerate, which makes the
    same choice, but load quantized models there (`quantized_placement`)."""
    if not has_cuda():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return f"cuda:{local_rank}"
    import torch

    return f"cuda:{torch.cuda.current_device()}"


def quantized_placement() -> dict[str, Any]:
    """from_pretrained's device map for a model that is or becomes quantized: this process's device. Such a
    model cannot be moved once loaded, and bitsandbytes otherwise loads it on the current CUDA device, device
    0 in every rank before the Trainer sets it (LlamaFactory passes the same map)."""
    return {"device_map": {"": compute_device()}}


def place_on_compute_device(model: Any) -> Any:
    """The model moved to compute_device(). A bitsandbytes model stays put: it cannot be moved, and loading
    already quantized it on the GPU (transformers' device map for it defaults to the current one)."""
    if not getattr(model, "is_quantized", False) and getattr(model, "hf_device_map", None) is None:
        model.to(compute_device())
    return model
