"""`tunefactory compare`: finetune runs side by side, read back from MLflow with `search_runs`.

The table shows the recipe keys that differ between the runs, base and tuned scores, training
throughput, wall time and cache hits; a PNG shows each run's loss curve and the chosen metric per run.
Both are written to files and logged to MLflow as a `compare` run in the experiment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Run

from flows.chaining import is_own_trainer
from tasks.core import tracking
from tasks.core.errors import TuneFactoryError


@dataclass
class Compared:
    """Runs, the table that compares them, and where the table and the figure were written."""

    experiment: str
    runs: list[Run]
    table: str
    figure: Path
    mlflow_run_id: str


def require_tracking_store() -> None:
    """Refuse to read runs from a SQLite store that does not exist (reading would create it empty)."""
    if (missing := tracking.missing_database()) is not None:
        raise TuneFactoryError(f"no MLflow store at {missing}: run it where mlflow.db is, or set MLFLOW_TRACKING_URI")


def latest_experiment() -> str:
    """The experiment of the newest finetune run."""
    require_tracking_store()
    found = tracking.newest_runs(1)
    if not found:
        raise TuneFactoryError(f"no finetune runs in the MLflow store {tracking.tracking_uri()}")
    return tracking.client().get_experiment(found[0].info.experiment_id).name


def finished_runs(experiment: str, last: int) -> list[Run]:
    """The experiment's newest finished finetune runs, oldest first."""
    require_tracking_store()
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TuneFactoryError(f"no MLflow experiment named '{experiment}' in {tracking.tracking_uri()}")
    runs = client.search_runs([found.experiment_id], f"{tracking.FINETUNE_RUNS} and attributes.status = 'FINISHED'",
                              max_results=last, order_by=["attributes.start_time DESC"])
    if not runs:
        raise TuneFactoryError(f"experiment '{experiment}' has no finished finetune runs")
    return list(reversed(runs))


def trainer_run(run: Run) -> Run | None:
    """The nested run that trained a finetune run's own model (sft's train, rm's reward, dpo and kto's preference,
    ppo's; not that of a recipe it chains on, labelled 'recipe:stage'): where the training was a cache hit, the
    stage run of the run that built it, which holds the loss history and throughput."""
    stage = next((stage for stage in tracking.stage_runs(run)
                  if is_own_trainer(stage.data.tags.get("stage", ""), stage.info.run_name or "")), None)
    built_by = stage.data.tags.get("built_by_run", "") if stage is not None else ""
    if stage is not None and stage.data.tags.get("cache") == "hit" and built_by not in ("", "unknown"):
        try:
            return tracking.client().get_run(built_by)
        except Exception:  # noqa: BLE001 - that run was deleted from MLflow: nothing more to show
            return stage
    return stage


def differing_params(runs: list[Run]) -> list[str]:
    """Recipe keys whose values are not the same in every run."""
    names = sorted({name for run in runs for name in run.data.params})
    return [n for n in names if len({run.data.params.get(n) for run in runs}) > 1]


def describe(runs: list[Run], metric: str) -> str:
    """A plain-text table: one column per run."""
    columns = [run.info.run_name or run.info.run_id[:8] for run in runs]
    rows: list[tuple[str, list[str]]] = [("run id", [run.info.run_id[:12] for run in runs])]
    rows += [(name, [run.data.params.get(name, "-") for run in runs]) for name in differing_params(runs)]
    for role in ("base", "tuned"):
        for name in dict.fromkeys([metric, "rougeL", "bleu4", "eval_loss"]):
            values = [run.data.metrics.get(f"{role}_{name}") for run in runs]
            if any(v is not None for v in values):
                rows.append((f"{role} {name}", [f"{v:.3f}" if v is not None else "-" for v in values]))
    trains = [trainer_run(run) for run in runs]
    rows.append(("train tokens/s", [f"{t.data.metrics['tokens_per_second']:.1f}" if t and
                                    "tokens_per_second" in t.data.metrics else "-" for t in trains]))
    rows.append(("wall seconds", [f"{(run.info.end_time - run.info.start_time) / 1000:.1f}" for run in runs]))
    rows.append(("cache hits", [run.data.tags.get("cache_hits", "-") for run in runs]))
    width = max(len(label) for label, _ in rows) + 2
    cell = max(14, *(len(c) + 2 for c in columns), *(len(v) + 2 for _, values in rows for v in values))
    lines = [" " * width + "".join(f"{c:>{cell}}" for c in columns)]
    lines += [f"{label:<{width}}" + "".join(f"{v:>{cell}}" for v in values) for label, values in rows]
    return "\n".join(lines)


def plot(runs: list[Run], metric: str, path: Path) -> Path:
    """Loss curve of each run and the tuned metric per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = tracking.client()
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [run.info.run_name or run.info.run_id[:8] for run in runs]
    for run, name in zip(runs, names, strict=True):
        train = trainer_run(run)
        history = client.get_metric_history(train.info.run_id, "loss") if train else []
        curves.plot([m.step for m in history], [m.value for m in history], marker=".", label=name)
    curves.set(title="training loss", xlabel="step", ylabel="loss")
    curves.legend(fontsize="small")
    for role, marker in (("base", "s"), ("tuned", "o")):
        values = [run.data.metrics.get(f"{role}_{metric}", float("nan")) for run in runs]
        bars.plot(range(len(runs)), values, marker=marker, linestyle="", label=role)
        for x, value in enumerate(values):
            bars.annotate(f"{value:.3f}", (x, value), textcoords="offset points", xytext=(6, 0), fontsize="small")
    bars.set(title=metric, ylabel=metric, xticks=range(len(runs)), xticklabels=names, xlim=(-0.5, len(runs) - 0.2))
    bars.legend(fontsize="small")
    bars.tick_params(axis="x", labelrotation=30)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def compare(experiment: str | None, metric: str, last: int, out: Path) -> Compared:
    """Compare the newest `last` runs of an experiment (default: the newest run's experiment)."""
    if not out.parent.is_dir():
        raise TuneFactoryError(f"--out {out}: folder {out.parent} does not exist")
    experiment = experiment or latest_experiment()
    runs = finished_runs(experiment, last)
    scored = sorted({name.split("_", 1)[1] for run in runs for name in run.data.metrics
                     if name.startswith(("base_", "tuned_"))})
    if scored and metric not in scored:  # runs that scored nothing (no evaluation) still compare keys and losses
        raise TuneFactoryError(f"--metric {metric}: no run of experiment '{experiment}' scored it (scored: "
                               f"{', '.join(scored)})")
    table = describe(runs, metric)
    figure = plot(runs, metric, out)
    client = tracking.client()
    tags = {"tunefactory.flow": "compare", "compared_runs": ",".join(r.info.run_id for r in runs)}
    record = client.create_run(runs[0].info.experiment_id, run_name="compare", tags=tags)
    client.log_text(record.info.run_id, table, "comparison.txt")
    client.log_artifact(record.info.run_id, str(figure))
    tracking.finish(record.info.run_id, ok=True)
    return Compared(experiment, runs, table, figure, record.info.run_id)
