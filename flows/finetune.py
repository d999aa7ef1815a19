"""The fine-tune flow: fetch -> align, model -> tokenize -> train -> merge -> evaluate (base, tuned).

Each stage is a Prefect task that receives its upstream tasks' futures, so the graph Prefect records
is the plan's graph, and independent stages may run side by side (`parallel`). A task is Cached
exactly when the artifact store holds a valid artifact for its key (tasks.core.prefect_store).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from flows.chaining import is_own_trainer
from flows.plan import Plan, plan_run
from flows.user_output import write_into
from tasks.core import tracking
from tasks.core.errors import TuneFactoryError
from tasks.core.memory import share_one_malloc_arena
from tasks.core.prefect_store import records_block
from tasks.core.recipe import Recipe
from tasks.core.stage import RunContext, clear_stop, request_stop, task_seconds
from tasks.core.store import ArtifactRef, ArtifactStore
from tasks.model import BUNDLED_HUB_ID

METRIC_ORDER = ("rouge1", "rouge2", "rougeL", "bleu4", "rouge1_lf", "rouge2_lf", "rougeL_lf", "bleu4_lf",
                "perplexity", "eval_loss", "pair_accuracy", "pair_margin", "reward_margin", "exam_average")


class StageResult(BaseModel):
    label: str
    stage: str
    key: str
    cached: bool  # a valid artifact existed, so nothing was built
    prefect_state: str  # "Cached" when the store answered Prefect's cache lookup
    seconds: float


class RunSummary(BaseModel):
    stages: list[StageResult]
    metrics: dict[str, dict[str, Any]]  # role (base, tuned) -> metrics.json
    mlflow_run_id: str
    flow_run_id: str  # the Prefect flow run
    artifacts: dict[str, str]  # stage label -> artifact directory
    experiment: str  # the MLflow experiment
    tracking_uri: str
    where: dict[str, str] = {}  # adapter, merged model, output_dir, export_dir -> folder

    def table(self) -> str:
        """The stage table and base-vs-tuned metrics, as plain text for the terminal."""
        width = max([28, *(len(s.label) + 1 for s in self.stages)])
        lines = [f"{'stage':<{width}} {'status':<7} {'key':<12} {'seconds':>8}"]
        lines += [
            f"{s.label:<{width}} {'cached' if s.cached else 'built':<7} {s.key[:12]:<12} {s.seconds:>8.1f}"
            for s in self.stages
        ]
        if self.metrics:
            roles = list(self.metrics)
            names = [k for k in METRIC_ORDER if any(k in m for m in self.metrics.values())]
            lines += ["", f"{'metric':<12}" + "".join(f"{r:>12}" for r in roles)]
            lines += [
                f"{n:<12}" + "".join(f"{self.metrics[r].get(n, float('nan')):>12.3f}" for r in roles) for n in names
            ]
        lines += [""] + [f"{name + ':':<14}{folder}" for name, folder in self.where.items()]
        lines.append(f"{'MLflow run:':<14}{self.mlflow_run_id} (experiment '{self.experiment}', {self.tracking_uri})")
        return "\n".join(lines)


def default_parallelism() -> int:
    """Stages run at once: $TUNEFACTORY_PARALLEL_STAGES, else 1 (sequential) on a machine of <= 2 cores, 2 above.
    Model-sized stages never overlap whatever this is (Stage.heavy)."""
    configured = os.environ.get("TUNEFACTORY_PARALLEL_STAGES", "").strip()
    if configured.isdigit():
        return max(1, int(configured))
    if configured:  # read as this module is imported, where an error could name nothing useful
        logging.getLogger(__name__).warning("TUNEFACTORY_PARALLEL_STAGES=%r is not a whole number; ignored",
                                            configured)
    return 1 if (os.cpu_count() or 1) <= 2 else 2


def stage_runner(parallel: int | None = None) -> ThreadPoolTaskRunner:
    """The task runner every flow runs its stages on: `parallel` (default default_parallelism()) at once."""
    return ThreadPoolTaskRunner(max_workers=parallel or default_parallelism())


def import_libraries_before_threads() -> None:
    """Import what stages resolve lazily, once, in this thread, when stages will run side by side: first imports
    of transformers' lazy attributes and of datasets raced from several threads fail ("module 'transformers' has
    no attribute 'PreTrainedTokenizerBase'"). Sequential runs skip it: a no-op re-run imports neither."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or getattr(context.task_runner, "_max_workers", 1) <= 1:
        return
    import datasets  # noqa: F401
    import transformers

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "PreTrainedTokenizerBase", "PreTrainedModel"):
        getattr(transformers, name)


def cancel_if_interrupted(flow, run, state) -> None:
    """An interrupted run (Ctrl-C, SIGTERM) ends Cancelled, not Crashed or left Running."""
    if state.message and "aborted by" in state.message:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelled(message=state.message), force=True)


def submit_all(plan: Plan, store: ArtifactStore, stage_runs: dict[str, str]) -> dict[str, Any]:
    """Submit every step's task, in plan order, each with its upstream steps' futures as inputs."""
    clear_stop()  # a new run (finetune, export, data preview): an earlier one's interruption is not its own
    import_libraries_before_threads()
    records = records_block(store.root)
    futures: dict[str, Any] = {}
    for step in plan:
        run = RunContext(home=str(store.root), mlflow_run_id=stage_runs[step.label])
        upstream = {name: futures[label] for name, label in step.inputs.items()}
        task = step.stage.task.with_options(task_run_name=step.label, result_storage=records,
                                            refresh_cache=step.force)
        # quote(): Prefect must not look inside a step for results of other tasks (a stage name string it
        # shares with an upstream reference would read as a dependency); the inputs carry the real ones.
        futures[step.label] = task.submit(step=quote(step), run=quote(run), inputs=upstream)
        futures[step.label].add_done_callback(functools.partial(tag_artifact, stage_runs[step.label]))
    return futures


def tag_artifact(run_id: str, future) -> None:
    """Tag a stage's MLflow run with its artifact key as soon as its task is done. `collect` waits in plan order,
    and until a run's stage runs name their keys gc cannot tell that the run uses them: an evaluation Prefect
    answered from its cache while training went on could be collected under the run (a build's own inputs are
    protected from its start by its read record)."""
    if (ref := artifact_now(future)) is not None:  # a failed task's error is raised by collect, where it is handled
        tracking.set_tags(run_id, {"artifact_key": ref.key})


def artifact_now(future) -> ArtifactRef | None:
    """A stage task's artifact if it has ended with one, without waiting: from the task's own final state (the
    server's record of it may lag); None if it failed, was cancelled or is still going."""
    try:
        return future.result(timeout=0)
    except BaseException:  # noqa: BLE001 - failed, cancelled or still going
        return None


def collect(plan: Plan, futures: dict[str, Any], store: ArtifactStore, stage_runs: dict[str, str]) -> list[StageResult]:
    """Wait for every step in plan order and close its MLflow run. At the first failure the error propagates
    and the flow's task runner cancels the steps still queued."""
    results = []
    for position, step in enumerate(plan.steps):
        future, run_id = futures[step.label], stage_runs[step.label]
        try:
            ref: ArtifactRef = future.result()
            built_by = store.open(ref).manifest.get("mlflow_run_id")
            cached = built_by != run_id  # this run's stage run built it, or an earlier run did
            tags = {"artifact_key": ref.key, "prefect_task_run_id": str(future.task_run_id)}
            if cached:  # often Prefect's cache answered and the stage's task never ran: its run gets the config here
                tracking.record_stage(run_id, {**tracking.hit_tags(built_by), **tags}, step.config.keyed())
            else:
                tracking.set_tags(run_id, tags)
        except BaseException as exc:  # no stage run is left RUNNING: this one failed, later ones as their tasks ended
            interrupted = not isinstance(exc, Exception)
            for later in plan.steps[position:]:
                ok = later is not step and artifact_now(futures[later.label]) is not None
                tracking.finish(stage_runs[later.label], ok=ok, interrupted=interrupted)
            raise
        tracking.finish(run_id, ok=True)
        results.append(StageResult(label=step.label, stage=step.stage.name, key=ref.key, cached=cached,
                                   prefect_state=future.state.name, seconds=task_seconds(future.task_run_id)))
    return results


def evaluation_metrics(plan: Plan, results: list[StageResult], store: ArtifactStore) -> dict[str, dict[str, Any]]:
    """metrics.json of each evaluate step, by role, with the id of the model artifact it scored."""
    by_label = {r.label: r for r in results}
    metrics = {}
    for step in plan.of_stage("evaluate"):
        values = json.loads((store.path("evaluate", by_label[step.label].key) / "metrics.json").read_text())
        scored = by_label[step.inputs["model"]]
        metrics[step.locators["role"]] = {**values, "model_artifact": f"{scored.stage}/{scored.key}"}
    for step in plan.of_stage("exam"):
        values = json.loads((store.path("exam", by_label[step.label].key) / "metrics.json").read_text())
        metrics.setdefault(step.locators["role"], {}).update(values)
    trained = own_trainer(results)
    if trained is not None and trained.stage == "reward":  # a reward model's own pairwise accuracy
        info = store.path("reward", trained.key)
        figures = json.loads((info / "train_results.json").read_text())
        if "eval_accuracy" in figures:
            metrics["tuned"] = {"pair_accuracy": figures["eval_accuracy"], "reward_margin": figures["eval_margin"],
                                "model_artifact": f"reward/{trained.key}"}
    return metrics


def own_trainer(results: list[StageResult]) -> StageResult | None:
    """This recipe's training step (not one of an upstream recipe it chains on)."""
    return next((r for r in results if is_own_trainer(r.stage, r.label)), None)


def copy_outputs(recipe: Recipe, results: list[StageResult], store: ArtifactStore, deliver: bool = True
                 ) -> dict[str, str]:
    """output_dir receives the adapter (or weights), export_dir the exported model, save_dir the exam reports
    (flows.user_output); with deliver false, nothing is written. Returns where the user finds things: the adapter,
    the merged model, and those folders (when written)."""
    by_stage = {r.stage: r for r in results if ":" not in r.label}
    where: dict[str, str] = {}
    own = own_trainer(results)
    if own is not None:
        trained = store.lookup(own.stage, own.key)
        part = "adapter" if trained.has("adapter") else "model"
        where[part] = str(trained.part(part))
        if recipe.training.output_dir and deliver:
            target = Path(recipe.training.output_dir)
            write_into(trained.part(part), target, trained.ref.id, "output_dir")
            if part == "adapter":
                name_base_model(target, recipe)
            where["output_dir"] = str(target.resolve())
    if "merge" in by_stage:
        where["merged model"] = str(store.path("merge", by_stage["merge"].key) / "model")
    if recipe.evaluation.save_dir and deliver:
        for result in results:
            if result.stage == "exam":
                role = result.label.removeprefix("exam[").removesuffix("]")
                found = store.lookup("exam", result.key)
                write_into(found.path, Path(recipe.evaluation.save_dir) / role, found.ref.id, "save_dir")
        where["save_dir"] = str(Path(recipe.evaluation.save_dir).resolve())
    if recipe.export.export_dir and "export" in by_stage and deliver:
        exported = store.lookup("export", by_stage["export"].key)
        write_into(exported.part("model"), Path(recipe.export.export_dir), exported.ref.id, "export_dir")
        where["export_dir"] = str(Path(recipe.export.export_dir).resolve())
    return where


def name_base_model(adapter_dir: Path, recipe: Recipe) -> None:
    """The user's copy of an adapter names the base model they gave (the store's copy names none: its bytes
    must not depend on a path), so AutoPeftModelForCausalLM.from_pretrained(adapter_dir) finds it."""
    settings_file = adapter_dir / "adapter_config.json"
    settings = json.loads(settings_file.read_text())
    settings["base_model_name_or_path"] = recipe.model.model_name_or_path or BUNDLED_HUB_ID
    settings_file.write_text(json.dumps(settings, indent=2, sort_keys=True))


def recipe_family(recipe: Recipe) -> str:
    """The MLflow experiment a recipe's runs share unless named: data, objective and method."""
    data = (recipe.data.dataset or recipe.data.eval_dataset or "eval").replace(",", "+")
    return f"{data}-{recipe.finetuning.stage}-{recipe.finetuning.finetuning_type}"


@flow(name="finetune", task_runner=stage_runner(),
      on_crashed=[cancel_if_interrupted])
def finetune(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
    experiment: str | None = None,
    deliver: bool = True,
) -> RunSummary:
    """Fine-tune and evaluate as the recipe says, reusing every stage whose artifact already exists.

    overrides: LlamaFactory keys over the recipe, as `--set` does (`{"lora_rank": 32}`). home: the
    artifact store (default $TUNEFACTORY_HOME or ./artifacts). experiment: the MLflow experiment (default
    $MLFLOW_EXPERIMENT_NAME, else named from the recipe's data, objective and method). deliver: copy the
    results into the recipe's output_dir, export_dir and save_dir (retune copies only a model that wins).
    A mistake in the recipe or the data ends the run Failed with the CLI's one-line message."""
    share_one_malloc_arena()  # a deployment's run starts here, not in the command
    try:
        recipe = recipe.checked("flow parameter 'recipe'", overrides, "flow parameter 'overrides'")
        return run_stages(recipe, ArtifactStore(home), experiment_for(recipe, experiment), deliver)
    except TuneFactoryError as exc:
        return Failed(message=f"tunefactory: error: {exc}", data=exc)


def experiment_for(recipe: Recipe, experiment: str | None) -> str:
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or recipe_family(recipe)


def run_stages(recipe: Recipe, store: ArtifactStore, experiment: str, deliver: bool = True) -> RunSummary:
    """Plan, run every stage as a Prefect task, and record the run in MLflow."""
    plan = plan_run(recipe, store)
    tags = {"tunefactory.flow": "finetune", "prefect_flow_run_id": str(flow_run.id or ""),
            "prefect_flow_run_name": str(flow_run.name or ""), "store": str(store.root)}
    # Named after the Prefect flow run unless the recipe names it: the two UIs then show the same name.
    parent = tracking.start_parent(recipe.training.run_name or flow_run.name, recipe.flat(), tags, experiment)
    stage_runs = {step.label: tracking.start_stage(parent, step.label, {"stage": step.stage.name})
                  for step in plan}
    try:
        results = collect(plan, submit_all(plan, store, stage_runs), store, stage_runs)
        metrics = evaluation_metrics(plan, results, store)
        for role, values in metrics.items():
            tracking.log_metrics(parent, {f"{role}_{k}": v for k, v in values.items()})
        where = copy_outputs(recipe, results, store, deliver)
    except BaseException as exc:
        request_stop()  # builds still running (a training thread) stop at their next step
        tracking.finish(parent, ok=False, interrupted=not isinstance(exc, Exception))  # Ctrl-C, SIGTERM: KILLED
        raise
    artifacts = {r.label: str(store.path(r.stage, r.key)) for r in results}
    summary = RunSummary(stages=results, metrics=metrics, mlflow_run_id=parent, flow_run_id=str(flow_run.id),
                         artifacts=artifacts, experiment=experiment, tracking_uri=tracking.tracking_uri(),
                         where=where)
    tracking.set_tags(parent, {"cache_hits": str(sum(r.cached for r in results))})
    tracking.finish(parent, ok=True)
    create_markdown_artifact(key="finetune-summary", markdown=f"```\n{summary.table()}\n```",
                             description="Stages (cached or built), evaluation metrics, where results are")
    return summary


def run_finetune(recipe: Recipe, home: str | None = None, parallel: int | None = None,
                 experiment: str | None = None) -> RunSummary:
    """Run the flow with `parallel` stages at once (default: default_parallelism()); a user error raises."""
    return finetune.with_options(task_runner=stage_runner(parallel))(recipe, home=home, experiment=experiment)
