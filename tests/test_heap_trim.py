"""trim_heap hands the heap's free pages back, and the train stage's callback trims every HEAP_TRIM_STEPS steps."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

import tasks.train_common as train_common
from tasks.core.memory import glibc

# Every other 64 KiB block freed: the holes sit below live blocks, so glibc cannot give them back by
# shrinking the heap's top, and they stay resident until trimmed.
FRAGMENT_THEN_TRIM = """
import sys
from tasks.core.memory import trim_heap
def rss_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
blocks = [bytearray(64 * 1024) for _ in range(2000)]
del blocks[::2]
before = rss_kib()
if sys.argv[1] == "trim":
    trim_heap()
print(before - rss_kib())
"""


def freed_kib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FRAGMENT_THEN_TRIM, mode], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.skipif(glibc() is None, reason="malloc_trim is glibc's")
def test_trim_hands_the_heaps_free_pages_back():
    assert freed_kib("keep") < 8 * 1024  # untrimmed, the 64 MiB of holes stay resident
    assert freed_kib("trim") > 48 * 1024


def test_the_train_callback_trims_every_heap_trim_steps(monkeypatch):
    trims = []
    monkeypatch.setattr(train_common, "trim_heap", lambda: trims.append(state.global_step))
    monkeypatch.setattr(train_common, "check_stop", lambda: None)
    callback = train_common.run_callback(None)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    for step in range(1, 3 * train_common.HEAP_TRIM_STEPS + 1):
        state.global_step = step
        callback.on_step_end(None, state, None)
    every = train_common.HEAP_TRIM_STEPS
    assert trims == [every, 2 * every, 3 * every]
