"""The `tunefactory` command exits promptly (flows.cli.entry) without losing output or its exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tasks.templates.show import list_templates

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_the_whole_output_arrives_and_the_exit_code_is_mains():
    done = subprocess.run([sys.executable, "-m", "flows", "templates"], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == [name for name, _ in list_templates()]


def test_exit_waits_for_thread_pools_and_exit_handlers_in_the_interpreters_order():
    """A live thread pool (Prefect and MLflow keep some) is stopped by threading's exit hook before threads
    are joined; joining first would wait on its idle workers forever."""
    script = """
import atexit, concurrent.futures, sys, time
import flows.cli

POOLS = []  # held, as a library's module-level pool is

def main():
    POOLS.append(concurrent.futures.ThreadPoolExecutor(1))
    POOLS[0].submit(lambda: (time.sleep(0.5), print("pool work done", flush=True)))
    atexit.register(lambda: print("exit handler ran", flush=True))
    return 3

flows.cli.main = main
flows.cli.entry()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=30)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["pool work done", "exit handler ran"]
