"""MLflow tracking: one parent run per flow run, one nested run per stage invocation.

Uses MlflowClient with explicit run ids rather than the fluent API, so nothing depends on which
thread Prefect runs a task in.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

EXPERIMENT = "tunefactory"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(mlflow: MlflowClient, name: str = EXPERIMENT) -> str:
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> flat MLflow params (`a.b`), values as short strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def start_parent(run_name: str | None, params: dict[str, Any], tags: dict[str, str]) -> str:
    mlflow = client()
    run = mlflow.create_run(experiment_id(mlflow), run_name=run_name, tags=tags)
    log_params(run.info.run_id, params)
    return run.info.run_id


def start_stage(parent_id: str, label: str, tags: dict[str, str]) -> str:
    mlflow = client()
    parent = mlflow.get_run(parent_id)
    run = mlflow.create_run(parent.info.experiment_id, run_name=label, tags={"mlflow.parentRunId": parent_id, **tags})
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    mlflow = client()
    for name, value in flatten(params).items():
        mlflow.log_param(run_id, name, value)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    mlflow = client()
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            mlflow.log_metric(run_id, name, float(value), step=step or 0)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    mlflow = client()
    for name, value in tags.items():
        mlflow.set_tag(run_id, name, str(value))


def finish(run_id: str, ok: bool) -> None:
    client().set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def hit_tags(built_by: str | None) -> dict[str, str]:
    """Tags of a stage run served from the store: which run built the artifact."""
    return {"cache": "hit", "built_by_run": built_by or "unknown", **prefect_tags()}


def prefect_tags() -> dict[str, str]:
    """Prefect flow/task run ids of the current context, for cross-linking MLflow and Prefect."""
    try:
        from prefect.runtime import flow_run, task_run

        ids = {"prefect_flow_run_id": flow_run.id, "prefect_task_run_id": task_run.id}
    except Exception:  # outside a Prefect run
        return {}
    return {name: str(value) for name, value in ids.items() if value}
