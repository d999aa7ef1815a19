"""A killed training resumes from its newest complete checkpoint when the same recipe runs again."""

import json
import os
import signal
import subprocess
import sys
import time

from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tasks.train import latest_complete_checkpoint
from tests.conftest import REPO


def test_latest_complete_checkpoint_skips_torn_ones(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()  # a torn checkpoint is removed, never resumed
    assert latest_complete_checkpoint(tmp_path / "checkpoint-2") is None


def complete_checkpoints(staging) -> list[int]:
    return sorted(
        int(p.name.split("-")[1]) for p in staging.glob("*/checkpoint-*") if (p / "trainer_state.json").is_file()
    )


def test_killed_training_resumes(write_recipe, workdir, tmp_path):
    recipe = write_recipe(max_samples=64, max_steps=120, save_steps=4, per_device_train_batch_size=2)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-child"), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(recipe)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = workdir / "artifacts" / ".staging" / "train"
    deadline = time.monotonic() + 240
    try:
        while not complete_checkpoints(staging):
            assert child.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    saved = complete_checkpoints(staging)
    assert saved and saved[-1] < 120
    assert not [p for p in (workdir / "artifacts" / "train").glob("*") if not p.name.startswith(".")]

    summary = finetune(load_recipe(recipe))
    stages = {s.label: s for s in summary.stages}
    assert stages["fetch[pydoc_summaries]"].cached and stages["model"].cached and stages["tokenize"].cached
    assert not stages["train"].cached
    results = json.loads((workdir / "artifacts" / "train" / stages["train"].key / "train_results.json").read_text())
    assert results["resumed_from_step"] >= saved[-1] and results["resumed_from_step"] % 4 == 0
    assert results["global_step"] == 120
    assert not (staging / stages["train"].key).exists()  # checkpoints are dropped once the artifact is published
