"""What a stage is, and how every stage runs: compute its key, reuse a valid artifact, or build one.

A stage module declares itself once:

    STAGE = Stage(
        name="merge",
        plan=plan,                       # recipe (+ upstream steps) -> Step: the typed config and the inputs
        build=build,                     # (config, ctx, out) -> Built: writes the artifact into `out`
        code=("tasks.merge",),           # modules whose source shapes the output (their digest enters the key)
        libraries=("torch", "transformers", "peft"),
        heavy=True,                      # loads a model: never two heavy builds at once on one machine
    )

From that declaration come the stage's Prefect task (`STAGE.task`) and its key. A key is the hash
of the stage's typed config (fields marked `unkeyed` left out), the content digests of its inputs,
the digest of its code and the versions of its libraries. Same key, same artifact.

Naming: a *stage* is a node of this DAG (fetch, align, ..., evaluate). LlamaFactory's recipe key
`stage: pt|sft|...` is called the *objective* in the code.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import tracking
from tasks.core.errors import TuneFactoryError
from tasks.core.hashing import code_digest, library_versions, stable_hash
from tasks.core.memory import return_freed_memory
from tasks.core.store import Artifact, ArtifactRef, ArtifactStore

CORE_LIBRARIES = ("torch", "transformers", "datasets")
_HEAVY_SLOT = threading.BoundedSemaphore(1)  # one model-sized build at a time in this process
_STOP = threading.Event()  # set when the run is interrupted; long builds check it between steps


class BuildInterrupted(Exception):
    """A build stopped because its run was interrupted (Ctrl-C, SIGTERM, or another stage failed)."""


def request_stop() -> None:
    """Ask running builds to stop at their next check (a training step, an evaluation batch)."""
    _STOP.set()


def clear_stop() -> None:
    _STOP.clear()


def check_stop() -> None:
    """Raise BuildInterrupted if the run was interrupted: nothing is published, checkpoints stay staged."""
    if _STOP.is_set():
        raise BuildInterrupted("the run was interrupted")


def unkeyed(default: Any, description: str = "") -> Any:
    """A config field that steers a build but cannot change its artifact (logging, checkpoint cadence)."""
    return Field(default, description=description, json_schema_extra={"keyed": False})


class StageConfig(BaseModel):
    """A stage's typed configuration, derived from the recipe by the stage's planner."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def keyed(self) -> dict[str, Any]:
        """The fields that enter the key: all but those declared with `unkeyed`."""
        fields = type(self).model_fields
        skip = {name for name, f in fields.items() if (f.json_schema_extra or {}).get("keyed") is False}
        return self.model_dump(mode="json", exclude=skip)

    @property
    def rng_seed(self) -> int:
        """The seed a build starts from (before anything random): the config's `seed`, else 0."""
        return getattr(self, "seed", None) or 0


@dataclass(frozen=True)
class Built:
    """What a build function reports: the artifact's kind, where its parts are, and facts about it."""

    kind: str
    layout: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)
    reports: tuple[str, ...] = ()  # layout parts that report how it was made (timings): not in its digest


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage's declaration (see the module docstring)."""

    name: str
    plan: Callable[..., Step]
    build: Callable[[Any, BuildContext, Path], Built]
    code: tuple[str, ...]
    libraries: tuple[str, ...] = CORE_LIBRARIES
    heavy: bool = False
    # Libraries that shape the result only for some configs (an optimizer chosen by a use_* key): keyed for those.
    config_libraries: Callable[[Any], tuple[str, ...]] | None = None

    @cached_property
    def code_digest(self) -> str:
        return code_digest(self.code)

    @cached_property
    def versions(self) -> dict[str, str]:
        return library_versions(self.libraries)

    def versions_for(self, config: StageConfig) -> dict[str, str]:
        """The versions of the libraries that shape this config's result."""
        extra = self.config_libraries(config) if self.config_libraries else ()
        return {**self.versions, **library_versions(extra)} if extra else self.versions

    def key(self, config: StageConfig, inputs: Mapping[str, ArtifactRef]) -> str:
        """The artifact key: config, input content digests, code digest, library versions."""
        return stable_hash(
            {
                "stage": self.name,
                "config": config.keyed(),
                "inputs": {name: ref.digest for name, ref in sorted(inputs.items())},
                "code": self.code_digest,
                "versions": self.versions_for(config),
            }
        )

    @cached_property
    def task(self):
        """This stage's Prefect task: its cache answers from the store (tasks.core.prefect_store)."""
        from prefect import task

        from tasks.core.prefect_store import STORE_CACHE

        return task(
            run_stage,
            name=self.name,
            cache_policy=STORE_CACHE,
            persist_result=True,
            result_serializer="json",
        )

    def step(
        self,
        label: str,
        config: StageConfig,
        inputs: Mapping[str, Step] | None = None,
        locators: Mapping[str, Any] | None = None,
    ) -> Step:
        """A planned invocation of this stage: inputs name upstream steps by their labels."""
        return Step(self, label, config, {n: s.label for n, s in (inputs or {}).items()}, dict(locators or {}))


@dataclass(frozen=True)
class Step:
    """One node of a planned run: a stage, its typed config, its upstream steps and where sources are.

    `locators` say where things are (file paths, display names) and never enter a key: sources are
    keyed by their content, so moving or renaming a file invalidates nothing."""

    stage: Stage
    label: str
    config: StageConfig
    inputs: dict[str, str]  # input name -> label of the upstream step
    locators: dict[str, Any]
    force: bool = False  # rebuild even if a valid artifact exists (overwrite_cache on data stages)


class RunContext(BaseModel):
    """Where a build publishes and which MLflow run it reports to; never part of a key."""

    home: str
    mlflow_run_id: str | None = None


@dataclass
class BuildContext:
    """What a build function may touch besides its config: its inputs, a staging dir, logging."""

    step: Step
    key: str
    store: ArtifactStore
    inputs: dict[str, Artifact]
    run: RunContext
    log: logging.Logger | logging.LoggerAdapter

    @property
    def staging(self) -> Path:
        return self.store.staging(self.step.stage.name, self.key)

    @property
    def locators(self) -> dict[str, Any]:
        return self.step.locators

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run.mlflow_run_id:
            tracking.log_metrics(self.run.mlflow_run_id, metrics, step)

    def log_files(self, files: list[Path]) -> None:
        """Attach files to the stage's MLflow run (a copy: the store keeps its own)."""
        if self.run.mlflow_run_id:
            for file in files:
                tracking.client().log_artifact(self.run.mlflow_run_id, str(file))


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a task run, stdlib logging outside one."""
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is not None:
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger("tunefactory")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so one key gives one result on a given machine."""
    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def waited_for(lock, what: str, log: logging.Logger, busy: str | None = None) -> Iterator[bool]:
    """A key's lock, held for the block, which gets whether it had to wait. While another run builds that key
    this waits, saying so once, and an interrupted run stops waiting within a second (a blocking wait outlived
    Ctrl-C by the other build's hours). With `busy`, a held lock is that error instead of a wait."""
    from filelock import Timeout

    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        if busy:
            raise TuneFactoryError(busy) from None
        log.info("waiting: another run is building %s", what)
        while True:
            check_stop()
            try:
                lock.acquire(timeout=1)
                break
            except Timeout:
                continue
    try:
        yield waited
    finally:
        lock.release()


def execute(step: Step, inputs: Mapping[str, ArtifactRef], run: RunContext) -> ArtifactRef:
    """Reuse the artifact for the step's key if it is valid; otherwise build it and publish atomically."""
    stage = step.stage
    store = ArtifactStore(run.home)
    key = stage.key(step.config, inputs)
    log = run_logger()
    # Nodes of one multi-node training that share a store would wait on each other's lock for good.
    busy = (f"{stage.name}/{key[:12]} is being built by another process using the store {store.root}; with "
            "nnodes > 1 each node needs a store of its own (--home)") if getattr(step.config, "nnodes", 1) > 1 else None
    with waited_for(store.lock(stage.name, key), f"{stage.name}/{key[:12]}", log, busy) as waited:
        found = None if step.force else store.lookup(stage.name, key)
        if found is not None:
            log.info("cached: %s/%s", stage.name, key[:12])
            if run.mlflow_run_id:
                tracking.set_tags(run.mlflow_run_id, tracking.hit_tags(found.manifest.get("mlflow_run_id")))
            return found.ref
        if waited:
            check_stop()  # interrupted while it waited: build nothing
        log.info("building %s/%s", stage.name, key[:12])
        if run.mlflow_run_id:
            tracking.record_stage(run.mlflow_run_id, {"cache": "miss", **tracking.prefect_tags()},
                                  step.config.keyed())
        ctx = BuildContext(step, key, store, {n: store.open(r) for n, r in inputs.items()}, run, log)
        reads = [ref.id for ref in inputs.values()]  # recorded before a heavy build queues for its slot
        with (store.reading(stage.name, key, reads), _HEAVY_SLOT if stage.heavy else nullcontext(),
              store.building(stage.name, key) as tmp):
            started_at, started = time.time(), time.monotonic()
            if stage.heavy:  # light stages take explicit seeds; reseeding here could disturb a heavy one
                seed_everything(step.config.rng_seed)
            built = stage.build(step.config, ctx, tmp)
            seconds = round(time.monotonic() - started, 2)
            if stage.heavy:
                return_freed_memory()
            header = {
                "key": key,
                "stage": stage.name,
                "label": step.label,
                "kind": built.kind,
                "layout": built.layout,
                "info": built.info,
                "reports": list(built.reports),
                "config": step.config.keyed(),
                "inputs": {name: {"id": ref.id, "digest": ref.digest} for name, ref in inputs.items()},
                "code": stage.code_digest,
                "versions": stage.versions_for(step.config),
                "mlflow_run_id": run.mlflow_run_id,
                "build_started": started_at,
                "build_seconds": seconds,
            }
            artifact = store.publish(tmp, header)
        store.clear_staging(stage.name, key)
        log.info("built %s/%s in %.1f s", stage.name, key[:12], seconds)
    return artifact.ref


_SECONDS: dict[str, float] = {}  # Prefect task run id -> seconds its body ran (a Cached task's never runs)


def run_stage(step: Step, run: RunContext, inputs: dict[str, ArtifactRef]) -> ArtifactRef:
    """The body of every stage's Prefect task."""
    from prefect.runtime import task_run

    started = time.monotonic()
    try:
        return execute(step, inputs, run)
    finally:
        _SECONDS[str(task_run.id)] = round(time.monotonic() - started, 2)


def task_seconds(task_run_id) -> float:
    """How long a stage task's body ran in this process (0 for a task answered from the cache)."""
    return _SECONDS.pop(str(task_run_id), 0.0)



def run_in_process(steps: Iterable[Step], home: str | Path) -> dict[str, ArtifactRef]:
    """Execute steps in order in this process, without Prefect or MLflow (tests, debugging); each step's
    inputs must come earlier. Returns every step's artifact reference by label."""
    clear_stop()  # a new run: an earlier run's interruption in this process (a failed flow) is not this one's
    refs: dict[str, ArtifactRef] = {}
    run = RunContext(home=str(home))
    for step in steps:
        refs[step.label] = execute(step, {name: refs[label] for name, label in step.inputs.items()}, run)
    return refs
