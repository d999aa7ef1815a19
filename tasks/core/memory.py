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
    if (libc := glibc()) is not None:
        libc.malloc_trim(0)


def allocate_large_tensors_on_huge_pages() -> None:
    """Have torch advise the kernel to back its CPU tensors of 2 MiB and more with transparent huge pages
    (THP_MEM_ALLOC_ENABLE=1, a switch of torch's CPU allocator: madvise(MADV_HUGEPAGE) on each such
    allocation). In alternated runs the process's resident memory then peaked lower:
    bench/train_memory.py --steps 10 peaked at 1731/1754 MiB against 1817/1826 in bf16, 2080/1973 against
    2901/2859 in fp32 (a CPU without bf16), and 9 fp32 steps with checkpointing at 1979/2008 against
    2812/2982, in the same time. A loop that only allocates and frees one 2 MiB tensor runs 4-8 times
    slower (fresh pages each time); the train step, evaluation and fp32 generation did not (README,
    Performance). torch reads the switch once, at its first allocation, so this only takes effect before
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
    if (libc := glibc()) is not None:
        libc.mallopt(M_ARENA_MAX, 1)


@functools.cache
def glibc():
    """The C library this process runs on, if it is glibc. CDLL(None) looks symbols up in the process itself:
    ctypes.util.find_library would run ldconfig in a subprocess (10 ms) at every command's start."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only: not musl or macOS
    except OSError:
        return None
