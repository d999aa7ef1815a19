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

