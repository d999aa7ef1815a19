"""How every stage runs: compute its key, reuse a valid artifact, or build and publish a new one.

A stage module supplies `build(config, ctx, out) -> dict` that reads only `config` (its recipe
slice and derived values: exactly what the key covers) and the input artifacts in `ctx.inputs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.core import tracking
from tasks.core.hashing import code_digest, library_versions, stable_hash
from tasks.core.store import ArtifactRef, ArtifactStore, StageSpec

CORE_LIBRARIES = ("torch", "transformers", "datasets")


class Runtime(BaseModel):
    """Options that steer a run but cannot change an artifact, so they stay out of every key."""

    home: str
    mlflow_run_id: str | None = None
    force: bool = False
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int | None = None
    gradient_checkpointing: bool = True
    num_workers: int | None = None
    report_to: list[str] = []
    plot_loss: bool = False
    dataloader_num_workers: int = 0
    save_only_model: bool = False
    ddp_timeout: int = 1800
    resume_from_checkpoint: str | None = None


@dataclass
class BuildContext:
    """What a build function may touch besides its config: inputs, a staging dir, logging."""

    spec: StageSpec
    store: ArtifactStore
    runtime: Runtime
    inputs: dict[str, Path] = field(default_factory=dict)
    log: logging.Logger | logging.LoggerAdapter = logging.getLogger("tunefactory")

    @property
    def staging(self) -> Path:
        return self.store.staging(self.spec)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.runtime.mlflow_run_id:
            tracking.log_metrics(self.runtime.mlflow_run_id, metrics, step)


BuildFn = Callable[[dict[str, Any], BuildContext, Path], dict[str, Any] | None]


def make_spec(
    stage: str,
    label: str,
    config: dict[str, Any],
    inputs: dict[str, ArtifactRef | StageSpec],
    code_modules: Iterable[str],
    libraries: Iterable[str] = CORE_LIBRARIES,
    locators: dict[str, str] | None = None,
) -> StageSpec:
    """Name a stage invocation by the hash of its config, its inputs' keys, its code and libraries."""
    input_ids = {name: f"{ref.stage}/{ref.key}" for name, ref in inputs.items()}
    code = code_digest(code_modules)
    versions = library_versions(libraries)
    key = stable_hash({"stage": stage, "config": config, "inputs": input_ids, "code": code, "versions": versions})
    return StageSpec(
        stage=stage,
        label=label,
        key=key,
        config=config,
        inputs=input_ids,
        code=code,
        versions=versions,
        locators=locators or {},
    )


def artifact_cache_key(_context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key of a stage task: its artifact key, nothing else."""
    spec: StageSpec = parameters["spec"]
    return f"tunefactory-{spec.stage}-{spec.key}"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task run, stdlib logging outside one."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # no active Prefect run context
        return logging.getLogger("tunefactory")


def execute(spec: StageSpec, build: BuildFn, runtime: Runtime) -> ArtifactRef:
    """Reuse the artifact for spec.key if it is valid; otherwise build it and publish atomically."""
    store = ArtifactStore(runtime.home)
    ref = ArtifactRef(stage=spec.stage, key=spec.key)
    log = run_logger()
    run_id = runtime.mlflow_run_id
    with store.lock(spec.stage, spec.key):
        manifest = None if runtime.force else store.lookup(spec.stage, spec.key)
        if manifest is not None:
            log.info("%s: reusing %s", spec.label, spec.short)
            if run_id:
                tracking.set_tags(run_id, hit_tags(manifest.mlflow_run_id))
            return ref
        log.info("%s: building %s", spec.label, spec.short)
        if run_id:
            tracking.set_tags(run_id, {"cache": "miss", **prefect_tags()})
            tracking.log_params(run_id, spec.config)
        ctx = BuildContext(
            spec=spec,
            store=store,
            runtime=runtime,
            log=log,
            inputs={name: store.resolve(value) for name, value in spec.inputs.items()},
        )
        started = time.monotonic()
        with store.building(spec) as tmp:
            extra = build(spec.config, ctx, tmp) or {}
            seconds = round(time.monotonic() - started, 2)
            store.publish(spec, tmp, {"mlflow_run_id": run_id, "build_seconds": seconds, **extra})
        store.clear_staging(spec)
        log.info("%s: built %s in %.1fs", spec.label, spec.short, seconds)
    return ref


def hit_tags(built_by: str | None) -> dict[str, str]:
    return {"cache": "hit", "built_by_run": built_by or "unknown", **prefect_tags()}


def prefect_tags() -> dict[str, str]:
    """Prefect flow/task run ids of the current context, for cross-linking MLflow and Prefect."""
    try:
        from prefect.runtime import flow_run, task_run

        return {
            k: str(v) for k, v in {"prefect_flow_run_id": flow_run.id, "prefect_task_run_id": task_run.id}.items() if v
        }
    except Exception:
        return {}
