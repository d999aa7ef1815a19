"""Ctrl-C or SIGTERM of the CLI: training stops at its next step, nothing half-built is published, the
flow run ends Cancelled, and the Prefect server the command started is stopped (no orphan)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, servers_of

READ_STATES = (
    "from prefect.client.orchestration import get_client\n"
    "with get_client(sync_client=True) as client:\n"
    "    print(','.join(run.state.type.value for run in client.read_flow_runs()))\n"
)


def checkpoints(workdir: Path) -> list[Path]:
    return [p for p in (workdir / "artifacts" / ".staging" / "train").glob("*/checkpoint-*")
            if (p / "trainer_state.json").is_file()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupted_run_is_cancelled_and_cleaned_up(write_recipe, workdir, tmp_path, signum):
    recipe = write_recipe(max_samples=64, max_steps=2000, save_steps=4, per_device_train_batch_size=2)
    prefect_home = tmp_path / "prefect-child"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    child = subprocess.Popen([sys.executable, "-m", "flows", "run", str(recipe)], cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not checkpoints(workdir):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    assert servers_of(prefect_home), "the command runs its own Prefect server"
    if signum == signal.SIGINT:
        os.killpg(child.pid, signum)  # a terminal's Ctrl-C reaches the whole foreground process group
    else:
        os.kill(child.pid, signum)  # a supervisor's SIGTERM reaches the command only
    assert child.wait(timeout=90) == 130
    stderr = child.stderr.read().decode()
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr  # the CLI's line, not the stages' traces
    deadline = time.monotonic() + 15
    while servers_of(prefect_home):
        assert time.monotonic() < deadline, "the Prefect server outlived the command"
        time.sleep(0.2)
    assert not [p for p in (workdir / "artifacts" / "train").glob("*") if not p.name.startswith(".")]
    assert checkpoints(workdir), "staged checkpoints stay for the next run to resume from"
    states = subprocess.run([sys.executable, "-c", READ_STATES], env=env, capture_output=True, text=True,
                            timeout=180, check=True).stdout.strip()
    assert states == "CANCELLED"
    # MLflow tells the interrupted run from a failed one (KILLED), and leaves no stage run RUNNING
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [run.info.status for run in runs if "mlflow.parentRunId" not in run.data.tags]
    stages = {run.info.run_name: run.info.status for run in runs if "mlflow.parentRunId" in run.data.tags}
    assert parents == ["KILLED"] and stages["train"] == "KILLED" and "RUNNING" not in stages.values(), stages
