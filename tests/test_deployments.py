"""Deployments against a real Prefect server started on loopback: `tunefactory serve` with `prefect deployment run`,
and `prefect deploy --all` with a process worker."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.deployments import prefect_yaml
from flows.prefect_server import healthy
from tasks.core.ports import free_port
from tasks.core.store import ArtifactStore
from tests.conftest import REPO, finished_task_runs, tiny_recipe_values

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`prefect server start` on loopback with its own PREFECT_HOME; yields the environment that reaches it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(REPO)}
    for name in ("TUNEFACTORY_HOME", "MLFLOW_TRACKING_URI"):  # each client picks its own, as a user's would
        env.pop(name, None)
    process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                "--no-ui"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 180
    while not healthy(env["PREFECT_API_URL"]):
        assert process.poll() is None and time.monotonic() < deadline, "the Prefect server did not start"
        time.sleep(0.3)
    yield env
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


def prefect(env, *args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def flow_run_id(output: str) -> str:
    return re.search(r"flow-run/([0-9a-f-]{36})", output).group(1)


def client_for(env):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


def wait_final(env, run_id: str, timeout: float = 300):
    with client_for(env) as client:
        deadline = time.monotonic() + timeout
        while not (run := client.read_flow_run(run_id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run {run_id} did not finish"
            time.sleep(0.5)
        return run


def task_states(env, run_id: str, expected: int) -> list[str]:
    with client_for(env) as client:
        return [run.state.name for run in finished_task_runs(client, run_id, expected)]


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    """A folder to deploy from: a recipe folder with one tiny recipe, and nothing else of the user's."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    values = tiny_recipe_values(tiny_model_dir, max_steps=2, max_samples=8, max_new_tokens=4)
    (recipes / "tiny.yaml").write_text(yaml.safe_dump(values))
    return tmp_path


def test_committed_prefect_yaml_is_current():
    assert (REPO / "prefect.yaml").read_text() == prefect_yaml()


def test_served_deployments_run_cache_share_and_fail_cleanly(server, project):
    serving = subprocess.Popen([sys.executable, "-m", "flows", "serve", "--recipes", str(project / "recipes")],
                               cwd=project, env=server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        with client_for(server) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name("finetune/tiny")
                    client.read_deployment_by_name("retune/tiny")
                    break
                except Exception:
                    assert serving.poll() is None and time.monotonic() < deadline, "deployments never appeared"
                    time.sleep(0.5)
        first = prefect(server, "deployment", "run", "finetune/tiny", "--watch")
        assert first.returncode == 0, first.stdout + first.stderr
        first_id = flow_run_id(first.stdout)
        assert wait_final(server, first_id).state.name == "Completed"
        store = ArtifactStore(project / "artifacts")  # where the CLI in that folder would put it
        assert {a.ref.stage for a in store.artifacts()} >= {"fetch", "align", "model", "tokenize", "train", "merge",
                                                            "evaluate"}
        mlflow = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
        assert mlflow.get_experiment_by_name("tiny") is not None

        again = prefect(server, "deployment", "run", "finetune/tiny", "--watch")
        assert again.returncode == 0
        states = task_states(server, flow_run_id(again.stdout), expected=10)
        assert len(states) == 10 and set(states) == {"Cached"}

        # Two runs of one new recipe variant at once: each artifact is built once, the other run reuses it.
        started = [prefect(server, "deployment", "run", "finetune/tiny", "--param", 'overrides={"lora_rank": 8}')
                   for _ in range(2)]
        ids = [flow_run_id(s.stdout) for s in started]
        assert [wait_final(server, i).state.name for i in ids] == ["Completed", "Completed"]
        trains = [r for r in mlflow.search_runs([mlflow.get_experiment_by_name("tiny").experiment_id],
                                                "attributes.run_name = 'train'")
                  if r.data.tags.get("prefect_flow_run_id") in ids]
        assert sorted(r.data.tags["cache"] for r in trains) == ["hit", "miss"]
        assert all(store.lookup(a.ref.stage, a.ref.key, full=True) for a in store.artifacts())

        published = {a.ref.id for a in store.artifacts()}
        bad = prefect(server, "deployment", "run", "finetune/tiny", "--watch", "--param", 'overrides={"lora_rnk": 4}')
        bad_run = wait_final(server, flow_run_id(bad.stdout))
        assert bad_run.state.name == "Failed"
        expected = "tunefactory: error: flow parameter 'overrides': unknown key 'lora_rnk'; did you mean 'lora_rank'?"
        assert bad_run.state.message == expected  # the CLI's one line, no traceback
        assert {a.ref.id for a in store.artifacts()} == published
    finally:
        os.killpg(serving.pid, signal.SIGINT)
        serving.wait(timeout=60)


def test_prefect_deploy_all_and_a_process_worker(server, project):
    for name in ("flows", "tasks", "configs"):  # the code, as a checkout of the repository has it
        (project / name).symlink_to(REPO / name)
    (project / "prefect.yaml").write_text(prefect_yaml(project / "recipes"))
    env = {**server, "PWD": str(project)}
    pool = prefect(env, "work-pool", "create", "tunefactory", "--type", "process", cwd=project)
    assert pool.returncode == 0 or "already exists" in pool.stdout
    deployed = prefect(env, "deploy", "--all", cwd=project)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    with client_for(env) as client:
        retune = client.read_deployment_by_name("retune/tiny")
        finetune = client.read_deployment_by_name("finetune/tiny")
    assert [s.active for s in retune.schedules] == [False]  # shipped inactive
    assert finetune.job_variables["env"] == {"TUNEFACTORY_HOME": f"{project}/artifacts",
                                             "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    started = prefect(env, "deployment", "run", "finetune/tiny", cwd=project)
    run_id = flow_run_id(started.stdout)
    worker = prefect(env, "worker", "start", "--pool", "tunefactory", "--run-once", cwd=project.parent)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    assert wait_final(env, run_id).state.name == "Completed"
    manifests = list((project / "artifacts").glob("merge/*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["kind"] == "merged_model"


SCHEDULE_STATE = """
import sys
from pathlib import Path
from prefect.client.orchestration import get_client
from flows.deployments import deployments_to_serve

folder, mode, switch_on = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
for deployment in deployments_to_serve(folder, mode):  # what `tunefactory serve --retune-schedule MODE` applies
    deployment.apply()
with get_client(sync_client=True) as client:
    retune = client.read_deployment_by_name("retune/tiny")
    if switch_on:  # as a user does in the UI
        client.update_deployment_schedule(retune.id, retune.schedules[0].id, active=True)
        client.pause_deployment(retune.id)
        retune = client.read_deployment_by_name("retune/tiny")
    print([schedule.active for schedule in retune.schedules], retune.paused)
"""


def test_serving_again_keeps_a_retune_schedule_the_user_switched_on(server, project):
    """Prefect recreates schedules with the state serve sends: each restart switched the weekly retune off."""
    def serve_once(mode: str, switch_on: bool = False) -> str:
        arguments = [str(project / "recipes"), mode, str(int(switch_on))]
        done = subprocess.run([sys.executable, "-c", SCHEDULE_STATE, *arguments], cwd=REPO, env=server,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert serve_once("keep", switch_on=True) == "[True] True"  # shipped off, then switched on (and paused)
    assert serve_once("keep") == "[True] True"  # serve restarted: as the user left it
    assert serve_once("off") == "[False] True"
    assert serve_once("on") == "[True] True"
