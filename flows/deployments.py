"""Deployments of the finetune and retune flows, one pair per recipe in configs/recipes/.

Two ways to run them (README, "Deployments"): `tunefactory serve` serves them all from one process,
or `prefect deploy --all` registers those in `prefect.yaml` with a `process` work pool that a
`prefect worker` runs. Both name them `finetune/<recipe>` and `retune/<recipe>`; the retune
deployment carries a weekly schedule, shipped inactive. `python -m flows.deployments` writes
prefect.yaml from the recipes (a test checks the committed file is current).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.core import tracking
from tasks.core.recipe import load_recipe
from tasks.core.store import default_root

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
POOL = "tunefactory"
RETUNE_CRON = "0 3 * * 1"  # Mondays 03:00 UTC; inactive until a user turns it on
HEADER = """\
# Prefect deployments of TuneFactory's flows, one finetune and one retune per recipe in configs/recipes/.
# Written by `python -m flows.deployments` (tests check it is current); see README, "Deployments".
# Deploy from this folder: `prefect deploy --all`. {{ $PWD }} is filled in then, so the store and the
# MLflow database of deployed runs are this folder's artifacts/ and mlflow.db, the CLI's defaults.
"""


def recipe_parameters(path: Path) -> dict[str, Any]:
    """A recipe file as the flow's `recipe` parameter: the keys it sets, grouped by section."""
    return load_recipe(path).model_dump(mode="json", exclude_defaults=True)


def recipe_files(folder: Path = RECIPES) -> list[Path]:
    return sorted(folder.glob("*.yaml"))


def runner_deployments(folder: Path = RECIPES, retune_active: bool | Mapping[str, bool] = False,
                       paused: Mapping[str, bool] | None = None) -> list:
    """Deployments for `tunefactory serve`: finetune/<recipe> and retune/<recipe> for every recipe file, each
    retune schedule on or off as `retune_active` says (per recipe name when a mapping; absent ones off), and a
    deployment paused where `paused` says so (by deployment name, finetune/<recipe>)."""
    from prefect.schedules import Cron

    from flows.finetune import finetune
    from flows.retune import retune

    paused = paused or {}

    deployments = []
    for path in recipe_files(folder):
        recipe, name = recipe_parameters(path), path.stem
        deployments.append(finetune.to_deployment(
            name=name, parameters={"recipe": recipe, "experiment": name}, tags=["tunefactory"],
            paused=paused.get(f"finetune/{name}", False),
            description=f"Fine-tune as {path.name} says; override keys with the `overrides` parameter."))
        deployments.append(retune.to_deployment(
            name=name, parameters={"recipe": recipe, "model_name": name, "experiment": name}, tags=["tunefactory"],
            paused=paused.get(f"retune/{name}", False),
            schedules=[Cron(RETUNE_CRON, timezone="UTC", active=retune_active.get(name, False)
                            if isinstance(retune_active, Mapping) else retune_active)],
            description=f"Re-tune {path.name} when its data changed; promote the champion only if it wins."))
    return deployments


def prefect_yaml(folder: Path = RECIPES) -> str:
    """The prefect.yaml declaring the same deployments for `prefect deploy --all` and a process work pool."""
    pool = {"name": POOL, "work_queue_name": "default",
            "job_variables": {"env": {"TUNEFACTORY_HOME": "{{ $PWD }}/artifacts",
                                      "MLFLOW_TRACKING_URI": "sqlite:///{{ $PWD }}/mlflow.db"}}}
    deployments = []
    for path in recipe_files(folder):
        recipe, name = recipe_parameters(path), path.stem
        deployments.append({"name": name, "entrypoint": "flows/finetune.py:finetune", "tags": ["tunefactory"],
                            "work_pool": pool, "parameters": {"recipe": recipe, "experiment": name}})
        deployments.append({"name": name, "entrypoint": "flows/retune.py:retune", "tags": ["tunefactory"],
                            "work_pool": pool, "schedules": [{"cron": RETUNE_CRON, "timezone": "UTC", "active": False}],
                            "parameters": {"recipe": recipe, "model_name": name, "experiment": name}})
    document = {"name": "tunefactory", "prefect-version": "3.8.8",
                "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}],
                "deployments": deployments}
    return HEADER + yaml.dump(document, Dumper=PlainDumper, sort_keys=False, width=120)


class PlainDumper(yaml.SafeDumper):
    """Writes repeated values out in full (no &anchors), so each deployment reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def pin_locations() -> tuple[str, str]:
    """Make the store root and MLflow URI absolute in this process's environment, so flow runs started from it
    (in other processes and working directories) write where the CLI would."""
    home = str(default_root())
    os.environ["TUNEFACTORY_HOME"] = home
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    return home, os.environ["MLFLOW_TRACKING_URI"]


def deployments_to_serve(folder: Path = RECIPES, retune_schedule: str = "keep") -> list:
    """The deployments `serve` applies. Prefect recreates a deployment's schedules, and its paused flag, with the
    state it is sent, so each restart switched a retune schedule a user had switched on in the UI off again (and
    would resume a deployment they paused): `keep` sends the state on the server now. `on` / `off` set every
    retune schedule; a new deployment's starts off."""
    names = [path.stem for path in recipe_files(folder)]
    active, paused = server_states(names)
    if retune_schedule in ("on", "off"):
        return runner_deployments(folder, retune_schedule == "on", paused)
    return runner_deployments(folder, active, paused)


def server_states(names: list[str]) -> tuple[dict[str, bool], dict[str, bool]]:
    """From the Prefect server: whether each retune/<name> has a schedule switched on (by recipe name), and
    whether each finetune/<name> and retune/<name> is paused (by deployment name); absent ones are left out."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    active, paused = {}, {}
    with get_client(sync_client=True) as client:
        for name in names:
            for flow_name in ("finetune", "retune"):
                try:
                    deployment = client.read_deployment_by_name(f"{flow_name}/{name}")
                except ObjectNotFound:
                    continue
                paused[f"{flow_name}/{name}"] = bool(deployment.paused)
                if flow_name == "retune":
                    active[name] = any(schedule.active for schedule in deployment.schedules)
    return active, paused


def serve(folder: Path = RECIPES, limit: int | None = None, retune_schedule: str = "keep") -> None:
    """Serve every recipe's deployments from this process until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments_to_serve(folder, retune_schedule), limit=limit)


if __name__ == "__main__":
    target = REPO / "prefect.yaml"
    target.write_text(prefect_yaml())
    print(f"wrote {target}", file=sys.stderr)
