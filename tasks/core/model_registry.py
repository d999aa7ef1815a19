"""Merged models in the MLflow model registry: versions, the `champion` alias, where a version's files are.

A version's source is the merged model's folder in the artifact store (a `file:` URI), so registering
copies nothing and `models:/<name>@champion` downloads a folder that plain transformers loads. Its tags
name the store artifacts it came from, which keeps them out of `tunefactory gc`'s reach.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tasks.core import tracking

CHAMPION = "champion"


def register(name: str, model_dir: Path, run_id: str, tags: dict[str, str]) -> ModelVersion:
    """A new version of `name` whose files are model_dir."""
    client = tracking.client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Merged models fine-tuned by TuneFactory.")
    return client.create_model_version(name, source=model_dir.resolve().as_uri(), run_id=run_id, tags=tags)


def champion(name: str) -> ModelVersion | None:
    """The version holding the champion alias, if the model and the alias exist."""
    try:
        return tracking.client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promote(name: str, version: str) -> None:
    tracking.client().set_registered_model_alias(name, CHAMPION, version)


def tag_version(name: str, version: str, tags: dict[str, str]) -> None:
    client = tracking.client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def all_versions() -> list[ModelVersion]:
    """Every version of every registered model (for housekeeping)."""
    return list(tracking.client().search_model_versions(max_results=10_000))
