"""The re-tuning flow: fine-tune again when the data (or the recipe) changed, and promote the new model over
the registered champion only if it scores better on the same evaluation set.

Every decision (skipped, promoted, rejected) is an MLflow run in the `tunefactory-retune` experiment,
tagged with the registered model's name and the run's fingerprint, and a Prefect markdown artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from flows.finetune import RunSummary, copy_outputs, finetune, own_trainer, stage_runner
from flows.plan import Plan, plan_run
from tasks import evaluate
from tasks.core import model_registry, tracking
from tasks.core.errors import RecipeError, TuneFactoryError
from tasks.core.hashing import stable_hash
from tasks.core.prefect_store import records_block
from tasks.core.recipe import Recipe
from tasks.core.stage import RunContext
from tasks.core.store import ArtifactStore

EXPERIMENT = "tunefactory-retune"
LOWER_IS_BETTER = {"eval_loss", "perplexity"}
METRICS = ("rouge1", "rouge2", "rougeL", "bleu4", "perplexity", "eval_loss")


class RetuneDecision(BaseModel):
    decision: Literal["skipped", "promoted", "rejected"]
    model_name: str
    metric: str
    margin: float
    fingerprint: str
    reason: str
    challenger_version: str | None = None
    champion_version: str | None = None  # the champion before the decision
    challenger_score: float | None = None
    champion_score: float | None = None
    finetune_run_id: str | None = None

    def markdown(self) -> str:
        rows = [(k, v) for k, v in self.model_dump().items() if v is not None]
        return "\n".join([f"# Retune of `{self.model_name}`: {self.decision}", "", "| | |", "|---|---|"]
                         + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def fingerprint(plan: Plan, metric: str, margin: float) -> str:
    """What a retune depends on: every stage's keyed config (data and model content digests included), its code
    and library versions (an upgrade can change the result), and the decision rule."""
    stages = {step.label: {"config": step.config.keyed(), "code": step.stage.code_digest,
                           "versions": step.stage.versions_for(step.config)} for step in plan}
    return stable_hash({"stages": stages, "metric": metric, "margin": margin})


REGISTRY_TAG_LIMIT = 100_000  # characters MLflow's registry takes in a model version tag's value


def recipe_tag(recipe: Recipe, run_id: str) -> str:
    """The recipe's keys as JSON, whole (it was cut at 5,000 characters, and was then no longer JSON), or where to
    find them when a tag cannot hold them."""
    text = json.dumps(recipe.model_dump(exclude_defaults=True), default=str)
    return text if len(text) <= REGISTRY_TAG_LIMIT else f"too long for a tag: see the params of MLflow run {run_id}"


def last_decision(model_name: str):
    """The newest recorded retune decision for this registered model, or None."""
    client = tracking.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    found = client.search_runs([experiment.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                               filter_string=f"tags.registered_model = '{model_name}'")
    return found[0] if found else None


def better(challenger: float, champion: float, metric: str, margin: float) -> bool:
    """Whether the challenger wins by at least the margin (lower wins for losses, higher for scores)."""
    if challenger == champion:  # a tie is no improvement, whatever the margin
        return False
    if metric in LOWER_IS_BETTER:
        return challenger <= champion - margin
    return challenger >= champion + margin


def score_champion(version, recipe: Recipe, plan: Plan, summary: RunSummary, store: ArtifactStore,
                   metric: str) -> float:
    """The champion's score on the data the challenger was scored on (an evaluate stage, cached like any other).
    That is evaluate[tuned]'s input, not the first tokenize of the plan: a recipe built on another one (dpo on
    sft) plans the other recipe's tokenize first."""
    merge_key = version.tags.get("artifact.merge")
    champion = store.lookup("merge", merge_key) if merge_key else None
    if champion is None:
        raise RecipeError(f"registered model '{version.name}' version {version.version}: its merged model "
                          f"(merge/{merge_key}) is not in the store {store.root}; retune with the store it came from")
    data_label = plan["evaluate[tuned]"].inputs["data"]
    tokenized = store.lookup("tokenize", next(s.key for s in summary.stages if s.label == data_label))
    step = evaluate.STAGE.step("evaluate[champion]", evaluate.configure(recipe), locators={"role": "champion"})
    task = step.stage.task.with_options(task_run_name=step.label, result_storage=records_block(store.root))
    ref = task(step=quote(step), run=quote(RunContext(home=str(store.root))),
               inputs={"data": tokenized.ref, "model": champion.ref})
    return json.loads((store.path(ref.stage, ref.key) / "metrics.json").read_text())[metric]


def record(decision: RetuneDecision) -> RetuneDecision:
    """The decision as an MLflow run and a Prefect markdown artifact."""
    client = tracking.client()
    run = client.create_run(tracking.experiment_id(client, EXPERIMENT), run_name=f"{decision.decision}",
                            tags={"registered_model": decision.model_name, "decision": decision.decision,
                                  "fingerprint": decision.fingerprint, "prefect_flow_run_id": str(flow_run.id or "")})
    values = decision.model_dump()
    tracking.log_params(run.info.run_id, {k: values[k] for k in ("metric", "margin", "challenger_version",
                                                                  "champion_version", "reason")})
    tracking.log_metrics(run.info.run_id, {k: values[k] for k in ("challenger_score", "champion_score")
                                           if values[k] is not None})
    tracking.client().log_text(run.info.run_id, decision.markdown(), "decision.md")
    tracking.finish(run.info.run_id, ok=True)
    create_markdown_artifact(key="retune-decision", markdown=decision.markdown(),
                             description=f"Retune of {decision.model_name}: {decision.decision}")
    return decision


@flow(name="retune", task_runner=stage_runner())  # Prefect's default runs every stage at once
def retune(
    recipe: Recipe,
    model_name: str,
    metric: str = "rougeL",
    margin: float = 0.0,
    overrides: dict[str, Any] | None = None,
    home: str | None = None,
    experiment: str | None = None,
) -> RetuneDecision:
    """Fine-tune again if anything the result depends on changed since `model_name`'s last retune; register the
    merged model and move the `champion` alias to it only if it beats the champion by `margin` on `metric`."""
    try:
        recipe = recipe.checked("flow parameter 'recipe'", overrides, "flow parameter 'overrides'")
        return decide(recipe, model_name, metric, margin, ArtifactStore(home), experiment)
    except TuneFactoryError as exc:
        return Failed(message=f"tunefactory: error: {exc}", data=exc)


def decide(recipe: Recipe, model_name: str, metric: str, margin: float, store: ArtifactStore,
           experiment: str | None) -> RetuneDecision:
    if metric not in METRICS:
        raise RecipeError(f"retune metric '{metric}': choose one of {', '.join(METRICS)}")
    if not recipe.finetuning.do_train or not recipe.evaluation.do_eval:
        raise RecipeError("retune needs a recipe that trains and evaluates (do_train and do_eval true)")
    plan = plan_run(recipe, store)
    if not plan.of_stage("evaluate"):
        raise RecipeError("retune needs evaluation data: set 'eval_dataset' or 'val_size'")
    if not plan.of_stage("merge"):
        why = (f"stage {recipe.finetuning.stage} trains a reward model, which scores replies and is not registered"
               if recipe.finetuning.stage == "rm" else "this model ships quantized, and its adapter cannot be merged")
        raise RecipeError(f"retune registers the merged tuned model; {why}")
    if metric not in ("perplexity", "eval_loss") and not plan["evaluate[tuned]"].config.generate:
        raise RecipeError(f"retune metric '{metric}' scores generated replies, which this recipe does not generate "
                          f"(stage {recipe.finetuning.stage}, do_predict {recipe.evaluation.do_predict}); use "
                          "--metric eval_loss or perplexity")
    base = {"model_name": model_name, "metric": metric, "margin": margin,
            "fingerprint": fingerprint(plan, metric, margin)}
    last = last_decision(model_name)
    if last is not None and last.data.tags.get("fingerprint") == base["fingerprint"]:
        return record(RetuneDecision(decision="skipped", reason="data and recipe unchanged since the last retune "
                                     f"({last.data.tags.get('decision')}, run {last.info.run_id})", **base))
    # The challenger's adapter and export reach output_dir and export_dir only if it wins.
    summary = finetune(recipe, home=str(store.root), experiment=experiment, deliver=False)
    tuned = summary.metrics["tuned"]
    trained = own_trainer(summary.stages)
    merge_key = next(s.key for s in summary.stages if s.stage == "merge")
    tags = {"recipe": recipe_tag(recipe, summary.mlflow_run_id),
            f"artifact.{trained.stage}": trained.key, "artifact.merge": merge_key, "fingerprint": base["fingerprint"],
            "store": str(store.root), **{f"metric.{k}": str(v) for k, v in tuned.items() if isinstance(v, float)}}
    score = tuned[metric]
    # Both scores before registering: a failure must not leave a version without a decision (the next run would
    # not skip, and would register yet another).
    current = model_registry.champion(model_name)
    if current is not None and current.tags.get("artifact.merge") == merge_key:  # a margin or unkeyed change
        return record(RetuneDecision(decision="skipped", reason=f"the model trained is the champion itself (version "
                                     f"{current.version}, merge/{merge_key[:12]}): nothing new to register", **base))
    held = score_champion(current, recipe, plan, summary, store, metric) if current is not None else None
    version = model_registry.register(model_name, Path(summary.where["merged model"]), summary.mlflow_run_id, tags)
    outcome = {**base, "challenger_version": str(version.version), "challenger_score": score,
               "finetune_run_id": summary.mlflow_run_id}
    if current is None:
        decision = RetuneDecision(decision="promoted", reason="no champion yet", **outcome)
    else:
        outcome |= {"champion_version": str(current.version), "champion_score": held}
        if better(score, held, metric, margin):
            decision = RetuneDecision(decision="promoted", reason=f"{metric} {score:.4f} beats {held:.4f} by the "
                                      f"margin {margin}", **outcome)
        else:
            decision = RetuneDecision(decision="rejected", reason=f"{metric} {score:.4f} does not beat the "
                                      f"champion's {held:.4f} by the margin {margin}", **outcome)
    if decision.decision == "promoted":
        model_registry.promote(model_name, version.version)
    model_registry.tag_version(model_name, version.version, {"retune_decision": decision.decision})
    record(decision)
    if decision.decision == "promoted":  # after the decision is recorded: a failed copy must not undo it
        copy_outputs(recipe, summary.stages, store)
    return decision
