"""Chained recipes: `adapter_name_or_path` and `reward_model` may name the recipe that trains them, an artifact
(`train/<key>`, `reward/<key>`, ...), or a folder.

A recipe is planned too, and its training steps join this plan under its name (`sft_demo:train`);
steps that both recipes share (the same stage, config and inputs: the base model, a dataset) appear
once. So `tunefactory run ppo.yaml` on a fresh store builds sft, then rm, then ppo, and on a warm store
reuses all of them. Artifacts and folders are imported by the adapter stage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from tasks import adapter
from tasks.core.errors import RecipeError, TuneFactoryError
from tasks.core.hashing import stable_hash
from tasks.core.recipe import Recipe, load_recipe
from tasks.core.stage import Step
from tasks.core.store import ArtifactStore

ARTIFACT_ID = re.compile(r"^(train|preference|ppo|reward|adapter)/([0-9a-f]{64})$")
TRAINERS = {"train", "reward", "preference", "ppo"}
KEPT_UPSTREAM = {"fetch", "align", "model", "tokenize", "adapter", *TRAINERS}  # not its merge, export or evaluation


def is_recipe_file(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) and Path(value).is_file()


def is_own_trainer(stage: str, label: str) -> bool:
    """Whether a step (or its run) is the recipe's own training, not an upstream recipe's (see `relabel`)."""
    return stage in TRAINERS and ":" not in label


def relabel(steps: Iterable[Step], prefix: str) -> list[Step]:
    """Steps with their labels (and their inputs' labels) prefixed by an upstream recipe's name."""
    return [replace(s, label=f"{prefix}:{s.label}", inputs={n: f"{prefix}:{u}" for n, u in s.inputs.items()})
            for s in steps]


def identities(steps: list[Step]) -> dict[str, str]:
    """Each step's identity by label: a hash of its stage, config and its inputs' identities (steps in order)."""
    identity: dict[str, str] = {}
    for step in steps:
        inputs = sorted((name, identity[label]) for name, label in step.inputs.items())
        identity[step.label] = stable_hash([step.stage.name, step.config.keyed(), inputs, step.force])
    return identity


def deduplicated(steps: list[Step]) -> list[Step]:
    """One step for each distinct (stage, config, inputs), at its first place in the order; it keeps this recipe's
    own label (without an upstream prefix) where it has one, the shortest otherwise ("model" over "model[ref]"),
    and every user points at it."""
    identity = identities(steps)
    canonical: dict[str, str] = {}
    for step in steps:
        ident = identity[step.label]
        rank = (":" in step.label, len(step.label))  # this recipe's own label first, then the plainest
        if ident not in canonical or rank < (":" in canonical[ident], len(canonical[ident])):
            canonical[ident] = step.label
    kept, emitted = [], set()
    for step in steps:
        ident = identity[step.label]
        if ident in emitted:
            continue
        emitted.add(ident)
        inputs = {name: canonical[identity[label]] for name, label in step.inputs.items()}
        kept.append(replace(step, label=canonical[ident], inputs=inputs))
    return kept


def resolve(value: str, key: str, wanted: str, store: ArtifactStore | None,
            plan: Callable[[Recipe, str], list[Step]],
            chain: tuple[str, ...]) -> tuple[Step, list[Step]]:
    """The step that provides `key`'s adapter (wanted: adapter) or reward model, and the upstream steps it needs."""
    if is_recipe_file(value):
        path = Path(value).resolve()
        if str(path) in chain:
            raise RecipeError(f"key '{key}': {value} leads back to itself ({' -> '.join(chain)})")
        upstream = load_recipe(path)
        objective = upstream.finetuning.stage
        if wanted == "reward_model" and objective != "rm":
            raise RecipeError(f"key '{key}': {value} trains stage {objective}, not a reward model (stage: rm)")
        if wanted == "adapter" and (objective == "rm" or upstream.finetuning.finetuning_type != "lora"):
            raise RecipeError(f"key '{key}': {value} does not train a LoRA adapter for a policy")
        try:
            planned = plan(upstream, str(path))
        except TuneFactoryError as exc:  # a mistake in the recipe named, not in the one being run
            raise type(exc)(f"{value} (named by key '{key}'): {exc}") from None
        steps = relabel([s for s in planned if s.stage.name in KEPT_UPSTREAM], path.stem)
        return next(s for s in reversed(steps) if s.stage.name in TRAINERS), steps
    match = ARTIFACT_ID.match(value)
    if match:
        found = store.lookup(match.group(1), match.group(2)) if store else None
        if found is None:
            raise RecipeError(f"key '{key}': artifact {value} is not in the store")
        if wanted == "reward_model" and found.kind != "reward_model":
            raise RecipeError(f"key '{key}': artifact {value} is a {found.kind}, not a reward model")
        if wanted == "adapter" and found.kind != "adapter":
            raise RecipeError(f"key '{key}': artifact {value} is a {found.kind}, not a LoRA adapter")
        folder = found.path if wanted == "reward_model" else found.part("adapter")
        return adapter.plan(folder, wanted, key, f"adapter[{key}]"), []
    return adapter.plan(Path(value).expanduser(), wanted, key, f"adapter[{key}]"), []


def same_base(ours: Step, upstream: list[Step], key: str) -> None:
    """An upstream recipe must train on the same base model (its model step is then shared)."""
    theirs = next((s for s in upstream if s.stage.name == "model"), None)
    if theirs is not None and theirs.config.keyed() != ours.config.keyed():
        raise RecipeError(f"key '{key}': the recipe it names trains on another base model; adapters only fit the "
                          "base they were trained on")


def merged_adapter(trainer: Step) -> str | None:
    """The label of the adapter a trainer merged into its base before training (create_new_adapter), or None."""
    lora = getattr(trainer.config, "lora", None)
    return trainer.inputs.get("adapter") if lora is not None and lora.create_new_adapter else None


def same_adapter_base(policy: Step, reward: Step, steps: list[Step]) -> None:
    """A LoRA reward model is put on the policy's base, so both must have merged the same adapter into that base
    (create_new_adapter) or neither: else the rm scores on a base it was not trained on. `steps` hold the adapters'
    own steps (an imported adapter's provenance is unknown and passes)."""
    if reward.stage.name not in TRAINERS:  # imported from a folder or an artifact id: how it was trained is unknown
        return
    identity = identities(steps)
    ours, theirs = merged_adapter(policy), merged_adapter(reward)
    if (ours and identity[ours]) == (theirs and identity[theirs]):
        return
    merged = "the base with its starting adapter merged (create_new_adapter)"
    theirs_base, ours_base = merged if theirs else "the plain base", merged if ours else "the plain base"
    if ours and theirs:
        ours_base = "the base with another adapter merged"
    raise RecipeError(f"key 'reward_model': the reward model was trained on {theirs_base}, this ppo recipe trains on "
                      f"{ours_base}; a LoRA reward model only fits the base it was trained on (match "
                      "create_new_adapter and adapter_name_or_path, or use reward_model_type: full)")
