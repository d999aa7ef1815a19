"""The fine-tune flow: fetch -> align -> tokenize -> model -> train -> merge -> evaluate (base, tuned).

Each stage is a Prefect task whose cache key is its artifact key. Before each task the flow checks
the store: a missing or damaged artifact forces the task to run even if Prefect remembers it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.plan import MARKER, Step, plan_run
from tasks.core import tracking
from tasks.core.recipe import Recipe
from tasks.core.stage import Runtime, hit_tags
from tasks.core.store import ArtifactStore


class StageResult(BaseModel):
    label: str
    stage: str
    key: str
    cached: bool  # a valid artifact existed, so nothing was built
    prefect_state: str  # "Cached" when Prefect's own cache answered
    seconds: float


class RunSummary(BaseModel):
    stages: list[StageResult]
    metrics: dict[str, dict[str, Any]]  # role (base, tuned) -> metrics.json
    mlflow_run_id: str
    artifacts: dict[str, str]  # stage label -> artifact directory

    def table(self) -> str:
        """The stage table and base-vs-tuned metrics, as plain text for the terminal."""
        lines = [f"{'stage':<28} {'status':<7} {'key':<12} {'seconds':>8}"]
        lines += [
            f"{s.label:<28} {'cached' if s.cached else 'built':<7} {s.key[:12]:<12} {s.seconds:>8.1f}"
            for s in self.stages
        ]
        if self.metrics:
            roles = list(self.metrics)
            names = [
                k
                for k in ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity", "eval_loss")
                if any(k in m for m in self.metrics.values())
            ]
            lines += ["", f"{'metric':<12}" + "".join(f"{r:>12}" for r in roles)]
            lines += [
                f"{n:<12}" + "".join(f"{self.metrics[r].get(n, float('nan')):>12.3f}" for r in roles) for n in names
            ]
        return "\n".join(lines)


def runtime_for(recipe: Recipe, home: Path) -> Runtime:
    t = recipe.training
    report_to = [t.report_to] if isinstance(t.report_to, str) else list(t.report_to)
    return Runtime(
        home=str(home),
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        gradient_checkpointing=not t.disable_gradient_checkpointing,
        num_workers=recipe.data.preprocessing_num_workers,
        plot_loss=t.plot_loss,
        report_to=[r for r in report_to if r not in ("none", "mlflow")],
        dataloader_num_workers=t.dataloader_num_workers,
        save_only_model=t.save_only_model,
        ddp_timeout=t.ddp_timeout,
        resume_from_checkpoint=t.resume_from_checkpoint,
    )


def run_step(step: Step, store: ArtifactStore, runtime: Runtime, parent_run: str) -> StageResult:
    """Run one stage task; log its nested MLflow run (cache hits point at the run that built it)."""
    spec = step.spec
    stage_run = tracking.start_stage(parent_run, spec.label, {"stage": spec.stage, "artifact_key": spec.key})
    manifest = None if step.force else store.lookup(spec.stage, spec.key)
    valid = manifest is not None
    started = time.monotonic()
    try:
        state = step.task.with_options(refresh_cache=not valid, task_run_name=spec.label)(
            spec=spec,
            runtime=runtime.model_copy(update={"mlflow_run_id": stage_run, "force": step.force}),
            return_state=True,
        )
        state.result()  # re-raises the task's exception
    except BaseException:
        tracking.finish(stage_run, ok=False)
        raise
    if valid:
        tracking.set_tags(
            stage_run,
            {
                **hit_tags(manifest.mlflow_run_id),
                "prefect_task_run_id": str(state.state_details.task_run_id),
            },
        )
    tracking.finish(stage_run, ok=True)
    return StageResult(
        label=spec.label,
        stage=spec.stage,
        key=spec.key,
        cached=valid,
        prefect_state=state.name,
        seconds=round(time.monotonic() - started, 2),
    )


def export_artifact(source: Path, target: str, artifact_id: str) -> None:
    """Copy an artifact folder to output_dir / export_dir, marking it as ours so a re-run may replace it."""
    target_path = Path(target)
    if target_path.exists():
        shutil.rmtree(target_path)
    shutil.copytree(source, target_path)
    (target_path / MARKER).write_text(json.dumps({"artifact": artifact_id}))


@flow(name="finetune", log_prints=True)
def finetune(recipe: Recipe, home: str | None = None) -> RunSummary:
    """Fine-tune and evaluate as the recipe says, reusing every stage whose artifact already exists."""
    store = ArtifactStore(home)
    steps = plan_run(recipe)
    runtime = runtime_for(recipe, store.root)
    parent = tracking.start_parent(
        recipe.training.run_name,
        recipe.flat(),
        {"prefect_flow_run_id": str(flow_run.id or ""), "store": str(store.root)},
    )
    results: list[StageResult] = []
    try:
        for step in steps:
            results.append(run_step(step, store, runtime, parent))
    except BaseException:
        tracking.finish(parent, ok=False)
        raise
    by_label = {s.spec.label: s.spec for s in steps}
    artifacts = {label: str(store.path(spec.stage, spec.key)) for label, spec in by_label.items()}
    metrics = {
        by_label[r.label].locators["role"]: json.loads((Path(artifacts[r.label]) / "metrics.json").read_text())
        for r in results
        if r.stage == "evaluate"
    }
    for role, values in metrics.items():
        tracking.log_metrics(parent, {f"{role}_{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    if recipe.training.output_dir and "train" in by_label:
        spec = by_label["train"]
        weights = "adapter" if recipe.finetuning.finetuning_type == "lora" else "model"
        export_artifact(Path(artifacts["train"]) / weights, recipe.training.output_dir, f"train/{spec.key}")
    if recipe.export.export_dir and "merge" in by_label:
        export_artifact(Path(artifacts["merge"]) / "model", recipe.export.export_dir, f"merge/{by_label['merge'].key}")
    summary = RunSummary(stages=results, metrics=metrics, mlflow_run_id=parent, artifacts=artifacts)
    tracking.finish(parent, ok=True)
    create_markdown_artifact(
        key="finetune-summary",
        markdown=f"```\n{summary.table()}\n```",
        description="Stages (cached or built) and evaluation metrics",
    )
    return summary


if __name__ == "__main__":  # `python -m flows.finetune run RECIPE.yaml` is the CLI
    import sys

    from flows.cli import main

    sys.exit(main())
