"""Weights that are views of their safetensors file, moved off it one tensor at a time.

`from_pretrained` maps a checkpoint's files and, where a tensor keeps the file's dtype, gives the model a
view of the mapping rather than a copy. Every page read through a view stays in the process's resident set
until the whole file is unmapped, which happens only once no tensor views it. Casting such a model tensor by
tensor would therefore hold every page of the file and every cast copy at once; transformers' own cast at
load (`dtype=torch.bfloat16` on an fp32 file) does the same. For SmolLM2-135M (a 538 MB fp32 file) that rise
was 914 MiB over the process before the load. Handing each tensor's pages back as soon as its copy exists
(madvise MADV_DONTNEED on the pages only it used) keeps one tensor's pages resident at a time: a 405 MiB
rise, in the same time. The file's bytes are untouched: a page handed back is read from the file again if
anything reads it.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from tasks.core.memory import glibc

if TYPE_CHECKING:
    import torch

MADV_DONTNEED = 4  # Linux: drop the pages from this process; file-backed ones are read from the file again


def safetensors_mappings() -> list[tuple[int, int]]:
    """Address ranges at which this process has a .safetensors file mapped (empty off Linux)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


class FileViews:
    """Replaces tensors that may be views of a mapped safetensors file, handing back the pages each one used."""

    def __init__(self) -> None:
        self.mappings = safetensors_mappings()
        self.madvise = _madvise() if self.mappings else None

    def replace(self, tensor: torch.Tensor, data: torch.Tensor) -> None:
        """`tensor.data = data`; if no tensor views the old storage any more and it lay in a mapped file, hand
        its pages back. Only the pages wholly inside it: a neighbour's tensor may share the edge pages."""
        from torch.multiprocessing.reductions import StorageWeakRef

        old = tensor.untyped_storage()
        start, size, old_storage = old.data_ptr(), old.nbytes(), StorageWeakRef(old)
        del old
        tensor.data = data
        if self.madvise is None or not old_storage.expired() or not self._mapped(start, size):
            return
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.madvise(first, last - first, MADV_DONTNEED)

    def _mapped(self, start: int, size: int) -> bool:
        return any(low <= start and start + size <= high for low, high in self.mappings)


def cast_weights(model: Any, dtype: torch.dtype, keep: Callable[[str], bool] = lambda name: False) -> None:
    """Cast the model's floating-point weights (parameters and the buffers saved with them) to dtype, one at a
    time, handing back the file pages of those that were views of their checkpoint (see the module
    docstring). `keep(name)` names the ones that keep their dtype. Buffers the model computes rather than
    loads (RoPE's inverse frequencies) keep theirs, as they do when from_pretrained casts."""
    views = FileViews()
    for name, tensor in _named_weights(model):
        if tensor.is_floating_point() and tensor.dtype != dtype and not keep(name):
            views.replace(tensor, tensor.data.to(dtype))


def _named_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter and saved buffer once (a tensor shared by several modules, as tied embeddings are, under
    its first name)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        saved = [(name, buffer) for name, buffer in module._buffers.items()
                 if name not in module._non_persistent_buffers_set]
        for name, tensor in (*module._parameters.items(), *saved):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                yield f"{prefix}.{name}" if prefix else name, tensor


def _madvise() -> Any:
    """glibc's madvise, or None off glibc."""
    if (libc := glibc()) is None:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def load_causal_lm(model_dir: Any, dtype: torch.dtype | str, device: str = "cpu", **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)` with the cast done here: the
    model loads as stored (views of its file), then `cast_weights` moves it to dtype. The modules the model
    class keeps in fp32 at that dtype (`_keep_in_fp32_modules[_strict]`) keep it here too. For a GPU device
    transformers loads it there directly: the views save host memory, which a GPU load does not spend."""
    import torch
    from transformers import AutoModelForCausalLM

    if device != "cpu":
        return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=device, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", **kwargs)
    if dtype == "auto" or getattr(model, "is_quantized", False):
        return model
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if dtype != torch.float32 else set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    cast_weights(model, dtype, keep=lambda name: any(f".{module}." in f".{name}" for module in keep))
    model.config.dtype = dtype
    return model
