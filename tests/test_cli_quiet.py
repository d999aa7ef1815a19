"""The `tunefactory` command turns off datasets' and transformers' per-file progress bars without importing
either library itself (a command that loads no data or model, such as a no-op re-run, stays fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from flows.cli import main
assert main(["templates"]) == 0
print(sorted({"datasets", "transformers"} & set(sys.modules)))
import datasets, transformers
print(datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())
"""


def test_bars_are_off_and_the_libraries_not_imported_by_the_command():
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    imported_by_command, bars = done.stdout.splitlines()[-2:]
    assert imported_by_command == "[]"
    assert bars == "False False"


def test_a_users_own_setting_wins():
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_DISABLE_PROGRESS_BARS": "0",
           "HF_HUB_DISABLE_PROGRESS_BARS": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "True True"


def test_libraries_imported_before_the_command_are_quieted_too():
    """main() called from Python after datasets and transformers were imported (their switches read already)."""
    script = ("import datasets, transformers\nfrom flows.cli import main\nassert main(['templates']) == 0\n"
              "print(datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled())")
    env = {k: v for k, v in os.environ.items() if "PROGRESS_BARS" not in k} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False False"
