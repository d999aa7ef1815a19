"""share_one_malloc_arena: threads that allocate share glibc's main arena instead of each making its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.core.memory import glibc

THREADS_ALLOCATE = """
import sys, threading
from tasks.core.memory import glibc, share_one_malloc_arena
if sys.argv[1] == "one":
    share_one_malloc_arena()
def work():
    kept = [bytearray(4096) for _ in range(1000)]
threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
glibc().malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


def arenas(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", THREADS_ALLOCATE, mode], capture_output=True, text=True,
                          check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's")
def test_threads_share_one_arena_once_asked():
    assert arenas("default") > 1  # glibc's default: the threads made their own
    assert arenas("one") == 1
