"""A killed training resumes from its newest usable checkpoint when the same recipe runs again."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from flows.finetune import finetune
from tasks.core.recipe import load_recipe
from tasks.train_checkpoints import checkpoint_problem, latest_usable_checkpoint
from tasks.train_common import whole_run_loss
from tests.conftest import REPO, servers_of, usable_checkpoints

LOG = logging.getLogger("test")


def make_checkpoint(folder, step: int, damage: str | None = None):
    """A checkpoint folder as the Trainer writes one for a LoRA run, optionally damaged."""
    folder.mkdir(parents=True)
    state = json.dumps({"global_step": step, "log_history": []})
    (folder / "trainer_state.json").write_text(state[: len(state) // 2] if damage == "torn_state" else state)
    if damage == "empty_state":
        (folder / "trainer_state.json").write_text("")
    save_file({"w": torch.zeros(4, 4)}, str(folder / "adapter_model.safetensors"))
    if damage == "torn_adapter":
        data = (folder / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) - 20])
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth"):
        if damage != f"no_{name.split('.')[0]}":
            torch.save({"x": torch.ones(2)}, folder / name)
    if damage == "torn_rng":  # a multi-rank kill while rank 1 wrote its RNG state after rank 0 wrote the rest
        (folder / "rng_state_1.pth").write_bytes((folder / "rng_state_1.pth").read_bytes()[:40])
    return folder


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (None, None),
        ("torn_state", "trainer_state.json is missing or torn"),
        ("empty_state", "trainer_state.json is missing or torn"),
        ("torn_adapter", "adapter_model.safetensors does not read"),
        ("no_optimizer", "optimizer.pt is missing or torn"),
        ("no_scheduler", "scheduler.pt is missing or torn"),
        ("torn_rng", "rng_state_1.pth is torn"),
    ],
)
def test_checkpoint_checks(tmp_path, damage, problem):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4, damage)
    found = checkpoint_problem(folder, save_only_model=False)
    assert (found is None) if problem is None else found.startswith(problem)


def test_save_only_model_needs_no_optimizer(tmp_path):
    folder = make_checkpoint(tmp_path / "checkpoint-4", 4, "no_optimizer")
    assert checkpoint_problem(folder, save_only_model=True) is None


def test_falls_back_to_the_previous_complete_checkpoint(tmp_path, caplog):
    make_checkpoint(tmp_path / "checkpoint-2", 2)
    make_checkpoint(tmp_path / "checkpoint-4", 4)
    make_checkpoint(tmp_path / "checkpoint-6", 6, "torn_adapter")
    make_checkpoint(tmp_path / "checkpoint-8", 8, "empty_state")
    with caplog.at_level(logging.INFO, logger="test"):
        assert latest_usable_checkpoint(tmp_path, False, LOG).name == "checkpoint-4"
    assert "not resuming from checkpoint-8: trainer_state.json" in caplog.text
    assert "resuming training from checkpoint-4" in caplog.text
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-8").exists()
    assert latest_usable_checkpoint(tmp_path / "nowhere", False, LOG) is None


def test_a_killed_run_from_an_explicit_checkpoint_resumes_from_its_own_newer_one(tmp_path):
    """With resume_from_checkpoint set, every re-run of a killed run went back to that checkpoint and lost the
    steps trained since (its staged checkpoints continue from it: the key covers it)."""
    from types import SimpleNamespace

    from tasks.train_common import resume_point

    given = make_checkpoint(tmp_path / "mine" / "checkpoint-100", 100)
    ctx = SimpleNamespace(locators={"resume_from_checkpoint": str(given)}, staging=tmp_path / "staging", log=LOG)
    config = SimpleNamespace(save_only_model=False)
    assert resume_point(config, ctx) == given  # nothing staged yet
    make_checkpoint(tmp_path / "staging" / "checkpoint-300", 300)
    assert resume_point(config, ctx) == tmp_path / "staging" / "checkpoint-300"


def test_whole_run_loss_joins_the_resumed_parts():
    history = [{"step": 2, "loss": 4.0}, {"step": 4, "loss": 2.0}, {"step": 6, "loss": 1.0}]
    assert whole_run_loss(history, 0, 3.0, 6) == 3.0  # not resumed: the Trainer's own figure
    # Resumed at step 4 of 6: steps 1-4 from the log (mean 3.0), steps 5-6 at this run's mean of 1.0.
    assert whole_run_loss(history, 4, 1.0, 6) == pytest.approx((4.0 * 2 + 2.0 * 2 + 1.0 * 2) / 6)
    assert whole_run_loss(history, 6, 0.0, 6) == pytest.approx((4.0 * 2 + 2.0 * 2 + 1.0 * 2) / 6)



def test_killed_training_resumes(write_recipe, workdir, tmp_path):
    recipe = write_recipe(max_samples=64, max_steps=120, save_steps=4, per_device_train_batch_size=2)
    prefect_home = tmp_path / "prefect-child"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "flows", "run", str(recipe)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    staging = workdir / "artifacts" / ".staging" / "train"
    deadline = time.monotonic() + 240
    try:
        while len(usable_checkpoints(staging)) < 2:
            assert child.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        assert servers_of(prefect_home), "the command runs its own Prefect server"
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 15  # a command killed outright cannot stop its server: the kernel signals it
    while servers_of(prefect_home):
        assert time.monotonic() < deadline, "the Prefect server outlived the killed command"
        time.sleep(0.2)
    saved = usable_checkpoints(staging)
    assert saved and saved[-1] < 120
    assert not [p for p in (workdir / "artifacts" / "train").glob("*") if not p.name.startswith(".")]
    newest = next(staging.glob(f"*/checkpoint-{saved[-1]}"))
    (newest / "optimizer.pt").write_bytes(b"")  # as if killed while writing it: resume from the one before

    summary = finetune(load_recipe(recipe))
    stages = {s.label: s for s in summary.stages}
    assert stages["fetch[pydoc_summaries]"].cached and stages["model"].cached and stages["tokenize"].cached
    assert not stages["train"].cached
    results = json.loads((workdir / "artifacts" / "train" / stages["train"].key / "train_results.json").read_text())
    assert results["resumed_from_step"] == saved[-2]
    assert results["global_step"] == 120
    assert results["train_loss"] > 0 and results["tokens_trained"] > 0  # the whole run's figures
    assert not (staging / stages["train"].key).exists()  # checkpoints are dropped once the artifact is published


def test_a_run_after_a_failed_one_in_the_same_process_is_not_interrupted(tiny_model_dir, tmp_path):
    """A failed flow asks its still-running builds to stop; that request outlived it, so the next in-process build
    (the chat and API engines build a recipe's model so) stopped at its first training step."""
    from flows.plan import plan_run
    from tasks.core.recipe import Recipe
    from tasks.core.stage import request_stop, run_in_process
    from tests.conftest import tiny_recipe_values

    request_stop()  # what run_stages does when a stage fails
    plan = plan_run(Recipe.from_flat(tiny_recipe_values(tiny_model_dir, max_samples=4, max_steps=1)))
    refs = run_in_process(plan.steps, tmp_path / "store")
    assert any(ref.stage == "train" for ref in refs.values())
