"""The process's heap: glibc's arenas shared by all threads, and freed memory handed back to the OS.

Imports nothing heavy, so the command can set the heap up before any library starts a thread.
"""

from __future__ import annotations

import functools
import gc
import os
import sys


def return_freed_memory() -> None:
    """Collect a heavy stage's garbage and hand the freed heap back to the OS. glibc keeps freed pages of a
    model's tensors in its heap, so the next stage (a second model for evaluation) would otherwise add to
    the first one's peak instead of reusing it; in the demo this was the whole flow's peak RSS."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the free pages inside glibc's heap back to the OS (malloc_trim): what the heap holds but no
    tensor uses. Pages handed back fault in again when reused, so a caller picks how often."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


def allocate_large_tensors_on_huge_pages() -> None:
    """Have torch put CPU tensors of 2 MiB and more on transparent huge pages (THP_MEM_ALLOC_ENABLE=1, a
    switch of torch's CPU allocator: 2 MiB-aligned, madvise(MADV_HUGEPAGE)). Those tensors then sit in
    their own mappings rather than between the small allocations of glibc's heap, where freed space
    fragmented and the heap grew past what the step's tensors used. Measured with
    bench/train_memory.py --steps 10 on the demo's LoRA step, alternated runs: peak RSS 1731/1754 MiB
    against 1817/1826 in bf16 (55.0/53.3 s against 59.2/55.8), 2080/1973 against 2901/2859 in fp32 (a
    CPU without bf16); fp32 with checkpointing, 9 steps: 1979/2008 against 2812/2982 MiB at 43.4/42.2 s
    against 42.4/44.1. Each such tensor gets fresh pages: a loop that only allocates and frees one 2 MiB
    tensor ran 4-8 times slower, but the train step, evaluation and fp32 generation took the same time
    (2026-12-03). torch reads the switch once, at its first allocation, so this only takes effect before
    `import torch`; a value the user set (THP_MEM_ALLOC_ENABLE=0 to opt out) is kept."""
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


M_ARENA_MAX = -8  # glibc's mallopt parameter that MALLOC_ARENA_MAX sets


def share_one_malloc_arena() -> None:
    """Have glibc serve every thread of this process from one heap, as MALLOC_ARENA_MAX=1 does. glibc gives
    each new thread that allocates an arena of its own (up to eight per core), and freed memory stays in
    the arena it came from: stages build in Prefect's worker threads while torch's threads allocate too,
    and what those arenas kept added to the demo's peak RSS. In four pairs of demo runs (alternated, train
    stage onward) one arena peaked 33-115 MB lower (1,920,284-1,999,564 KiB against 1,953,808-2,066,268),
    and training was no slower. Arenas made before the call stay in use, so the command calls it first."""
    if (libc := _glibc()) is not None:
        libc.mallopt(M_ARENA_MAX, 1)


@functools.cache
def _glibc():
    """The C library this process runs on, if it is glibc. CDLL(None) looks symbols up in the process itself:
    ctypes.util.find_library would run ldconfig in a subprocess (10 ms) at every command's start."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only: not musl or macOS
    except OSError:
        return None
