"""allocate_large_tensors_on_huge_pages: importing TuneFactory before torch puts torch's large CPU tensors
on transparent huge pages, and a user's own THP_MEM_ALLOC_ENABLE wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

ALLOCATE_AFTER_TASKS = """
import os, re, sys
if sys.argv[1] == "torch-first":
    import torch
import tasks
import torch
tensors = [torch.ones(1 << 22) for _ in range(4)]  # 16 MiB each, touched
huge = re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read())
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), int(huge.group(1)) if huge else -1)
"""


def run(order: str, **env: str) -> tuple[str, int]:
    environment = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"} | env
    done = subprocess.run([sys.executable, "-c", ALLOCATE_AFTER_TASKS, order], capture_output=True, text=True,
                          check=True, env=environment, cwd=Path(__file__).resolve().parents[1])
    switch, huge_kib = done.stdout.split()
    return switch, int(huge_kib)


def test_tasks_switches_huge_pages_on_before_torch_starts():
    assert run("tasks-first")[0] == "1"


def test_a_users_choice_is_kept():
    assert run("tasks-first", THP_MEM_ALLOC_ENABLE="0")[0] == "0"


def test_nothing_is_set_once_torch_has_started():
    assert run("torch-first")[0] == "None"  # torch read the switch already: setting it would only mislead


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists()
                    or "[madvise]" not in (THP_MODE.read_text() if THP_MODE.exists() else ""),
                    reason="needs Linux with transparent huge pages on request (madvise mode)")
def test_large_tensors_land_on_huge_pages():
    assert run("tasks-first")[1] > 0
    assert run("tasks-first", THP_MEM_ALLOC_ENABLE="0")[1] == 0  # in madvise mode, only what torch asked for
