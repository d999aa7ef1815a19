"""MLflow tracking: one parent run per flow run, one nested run per stage invocation.

Uses MlflowClient with explicit run ids rather than the fluent API, so nothing depends on which
thread Prefect runs a task in.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

EXPERIMENT = "tunefactory"


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def missing_database() -> Path | None:
    """The SQLite file the tracking URI names, if it does not exist: reading runs would create it empty (in
    whatever folder a command was started from)."""
    uri = tracking_uri()
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    return database if database is not None and not database.is_file() else None


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def flow_runs(flow: str) -> str:
    """search_runs' filter for one flow's runs."""
    return f"tags.`tunefactory.flow` = '{flow}'"


FINETUNE_RUNS = flow_runs("finetune")
STORE_FLOWS = ("finetune", "export", "data-preview")  # the flows whose stage runs build or reuse store artifacts


def newest_runs(last: int, flows: tuple[str, ...] = ("finetune",)) -> list:
    """The newest `last` runs of these flows in all experiments, newest first."""
    if last <= 0:
        return []
    found = client()
    ids = [e.experiment_id for e in found.search_experiments()]
    if not ids:
        return []
    runs = [run for name in flows  # one search per flow: MLflow's filter has no IN for tags
            for run in found.search_runs(ids, flow_runs(name), max_results=last,
                                         order_by=["attributes.start_time DESC"])]
    return sorted(runs, key=lambda run: run.info.start_time, reverse=True)[:last]


def runs_back_to_finished(last: int, flow: str, store: str) -> list:
    """A flow's runs on `store` (their `store` tag), newest first, back to the `last`-th that finished: the last N
    that finished and every failed or interrupted run since, whose artifacts a re-run resumes from."""
    if last <= 0:
        return []
    found = client()
    ids = [e.experiment_id for e in found.search_experiments()]
    runs, finished = [], 0
    # the store is compared here, not in the filter: a path may hold a quote
    for run in (run for run in search_all(found, ids, flow_runs(flow)) if run.data.tags.get("store") == store):
        runs.append(run)
        finished += run.info.status == "FINISHED"
        if finished == last:
            break
    return runs


def search_all(found, experiment_ids: list[str], query: str, page: int = 200):
    """Runs matching `query`, newest first, a page at a time (so a generator stops reading when it has enough)."""
    if not experiment_ids:
        return
    token = None
    while True:
        batch = found.search_runs(experiment_ids, query, max_results=page, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        yield from batch
        token = batch.token
        if not token:
            return


def running_runs(flows: tuple[str, ...]) -> list:
    """The runs of these flows still going (or killed without a word: MLflow cannot tell them apart)."""
    found = client()
    ids = [e.experiment_id for e in found.search_experiments()]
    return [run for name in flows for run in found.search_runs(
        ids, f"{flow_runs(name)} and attributes.status = 'RUNNING'")] if ids else []


def stage_runs(run, stage: str | None = None) -> list:
    """A flow run's nested stage runs, in the order they were created; only `stage`'s if named."""
    query = f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    if stage:
        query += f" and attributes.run_name = '{stage}'"
    return list(client().search_runs([run.info.experiment_id], query, max_results=1000,
                                     order_by=["attributes.start_time ASC"]))


def open_store() -> None:
    """Open the tracking store now. MLflow keeps one per URI for the process, and opening it (its SQL store's
    import, the database's schema check) took about a second of a no-op re-run: the CLI does it while the
    Prefect server boots rather than in the flow's first MLflow call."""
    client()


def artifact_root() -> str | None:
    """Where a new experiment keeps its files: beside a SQLite store (not relative to whichever working
    directory first created it, which differs between the CLI and a deployment's worker)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns")
    return None


def experiment_id(mlflow: MlflowClient, name: str = EXPERIMENT) -> str:
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_root())
    except Exception:  # created meanwhile by a concurrent run
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


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


def start_parent(run_name: str | None, params: dict[str, Any], tags: dict[str, str], experiment: str) -> str:
    """A flow's run in the named experiment, with its parameters."""
    mlflow = client()
    run = mlflow.create_run(experiment_id(mlflow, experiment), run_name=run_name, tags=tags)
    log_params(run.info.run_id, params)
    return run.info.run_id


def start_stage(parent_id: str, label: str, tags: dict[str, str]) -> str:
    mlflow = client()
    parent = mlflow.get_run(parent_id)
    run = mlflow.create_run(parent.info.experiment_id, run_name=label, tags={"mlflow.parentRunId": parent_id, **tags})
    return run.info.run_id


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """All params in batches (one request each, not one per param; MLflow takes 100 per batch)."""
    mlflow = client()
    entries = [Param(name, value) for name, value in flatten(params).items()]
    for batch in chunks(entries, 100):
        mlflow.log_batch(run_id, params=batch)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """The finite numbers among metrics, in one batch, under names MLflow accepts (see metric_name)."""
    stamp = int(time.time() * 1000)
    entries = [Metric(metric_name(name), float(value), stamp, step or 0) for name, value in metrics.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
    for batch in chunks(entries, 1000):
        client().log_batch(run_id, metrics=batch)


def metric_name(name: str) -> str:
    """MLflow takes only letters, digits, `_-. :/` in a metric name; others (an exam category's `&`) become `_`."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    entries = [RunTag(name, str(value)) for name, value in tags.items()]
    for batch in chunks(entries, 100):
        client().log_batch(run_id, tags=batch)


def record_stage(run_id: str, tags: dict[str, str], params: dict[str, Any]) -> None:
    """A stage run's tags and keyed config (params), in as few requests as MLflow allows (100 entries each)."""
    entries = [RunTag(name, str(value)) for name, value in tags.items()]
    entries += [Param(name, value) for name, value in flatten(params).items()]
    for batch in chunks(entries, 100):
        client().log_batch(run_id, tags=[e for e in batch if isinstance(e, RunTag)],
                           params=[e for e in batch if isinstance(e, Param)])


def finish(run_id: str, ok: bool, interrupted: bool = False) -> None:
    """End a run FINISHED, FAILED, or KILLED where it was interrupted (Ctrl-C, SIGTERM): MLflow's own word for it,
    so interrupted runs can be told from failed ones."""
    client().set_terminated(run_id, status="FINISHED" if ok else "KILLED" if interrupted else "FAILED")


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
