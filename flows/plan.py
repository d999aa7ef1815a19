"""Plan a run: every stage's typed config and upstream steps, validated before anything builds.

A step's key hashes the content of its inputs, so a key is known once its inputs exist: `describe`
walks the plan against the store and shows, for each step, its key and whether it is cached, or
which upstream step must be built first. Everything that can be judged from the recipe, the dataset
registry and the model's config is checked here, so a mistake fails before the first stage runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from flows.chaining import deduplicated, resolve, same_adapter_base, same_base
from flows.user_output import check_target
from tasks import align, evaluate, exam, export, fetch, merge, model, ppo, preference, quantize, reward, tokenize, train
from tasks.core.errors import RecipeError
from tasks.core.hardware import training_precision
from tasks.core.recipe import Recipe
from tasks.core.registry import DatasetEntry, resolve_datasets
from tasks.core.stage import Step
from tasks.core.store import ArtifactRef, ArtifactStore
from tasks.formats import dataset_kind
from tasks.quantize import check_prequantized, prequantized
from tasks.train_methods import check_trainable, meta_model

DATA_STAGES = {"fetch", "align", "tokenize"}
DATA_KINDS = {"preference": "preference (ranking) data", "kto": "KTO data", "pretrain": "pretraining text (no replies)",
              "sft": "conversations with single replies"}
OBJECTIVE_DATA = {"pt": ("pretrain", "sft"), "sft": ("sft",), "rm": ("preference",), "dpo": ("preference",),
                  "kto": ("kto",), "ppo": ("sft",)}  # dataset kinds each objective learns from


@dataclass(frozen=True)
class Plan:
    """The steps of a run in an order where every step comes after its inputs."""

    steps: tuple[Step, ...]

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __getitem__(self, label: str) -> Step:
        return next(step for step in self.steps if step.label == label)

    def labels(self) -> list[str]:
        return [step.label for step in self.steps]

    def of_stage(self, name: str) -> list[Step]:
        return [step for step in self.steps if step.stage.name == name]

    def upstream_of(self, label: str) -> Plan:
        """The step and every step it depends on, in plan order."""
        wanted, pending = set(), [label]
        while pending:
            current = pending.pop()
            if current not in wanted:
                wanted.add(current)
                pending += list(self[current].inputs.values())
        return Plan(tuple(step for step in self.steps if step.label in wanted))


def check_dataset_kind(entry: DatasetEntry, key: str, objective: str) -> None:
    """Refuse data the objective cannot learn from, before anything is fetched."""
    kind = dataset_kind(entry.formatting, entry.column_map(), entry.ranking)
    if kind not in OBJECTIVE_DATA[objective]:
        raise RecipeError(f"key '{key}': dataset '{entry.name}' holds {DATA_KINDS[kind]}, which stage {objective} "
                          "cannot train on")


def data_steps(recipe: Recipe, names: str | None, key: str, store: ArtifactStore | None) -> list[tuple[Step, Step]]:
    """(fetch, align) per dataset named by a recipe key."""
    data = recipe.data
    pairs = []
    for entry in resolve_datasets(names, data.dataset_dir, key, data.allow_outside_dataset_dir):
        check_dataset_kind(entry, key, recipe.finetuning.stage)
        fetched = fetch.plan(entry, data.streaming)
        cached = store is not None and not data.overwrite_cache and store.lookup("fetch", fetched.stage.key(
            fetched.config, {})) is not None
        if not cached:  # it will be fetched: a malformed row fails now, before any stage runs
            fetch.check_rows(fetched)
        pairs.append((fetched, align.plan(entry, fetched, recipe)))
    return pairs


def imported_model(model_step: Step, store: ArtifactStore | None):
    """The model stage's artifact, if the store holds it already (a hub or GGUF model imported before)."""
    return store.lookup("model", model_step.stage.key(model_step.config, {})) if store else None


def model_structure(model_step: Step, store: ArtifactStore | None):
    """The base model's modules without its weights, from its config: a local folder's, an imported model's
    already in the store, a GGUF file's metadata (the bundled model's: about 5 s, paid only by a check that
    needs module names), or the hub's config.json at the resolved commit. None where it cannot be read
    (offline, remote code); then train checks on the loaded model."""
    config, where = model_step.config, model_step.locators
    if config.trust_remote_code:
        return None
    if config.source_kind == "local":
        return meta_model(Path(where["path"]))
    found = imported_model(model_step, store)
    if found is not None:
        return meta_model(found.part("model"))
    if config.source_kind == "gguf":
        return meta_model(Path(where["path"]), gguf_file=where["gguf_file"])
    try:
        return meta_model(where["path"], revision=config.source.rsplit("@", 1)[-1])
    except (OSError, ValueError):  # no hub access now, or a model type transformers does not know
        return None


def plan_run(recipe: Recipe, store: ArtifactStore | None = None, chain: tuple[str, ...] = ()) -> Plan:
    """The stages of a fine-tune: data, model, training (with any upstream recipes it chains on), merge (and
    export), evaluation of the base and the tuned model. A recipe that does not train but names
    adapter_name_or_path evaluates the base with that adapter merged (as LlamaFactory evaluates model + adapter)."""
    data = recipe.data
    if recipe.finetuning.do_train and not data.dataset:
        raise RecipeError("key 'dataset' is required when do_train is true")
    train_pairs = data_steps(recipe, data.dataset, "dataset", store)
    # Held-out rows are tokenized with the training rows whatever do_eval says: the train stage keys on that
    # artifact, so toggling do_eval (as `tunefactory eval` does) must not retrain.
    eval_pairs = data_steps(recipe, data.eval_dataset, "eval_dataset", store)
    has_eval = bool(eval_pairs) or data.val_size > 0
    scores_rows = has_eval and recipe.evaluation.do_eval
    if not (train_pairs or scores_rows or recipe.evaluation.task or recipe.export.export_dir):
        if has_eval:
            raise RecipeError("nothing to do: do_eval is false, so the evaluation rows are not scored (set "
                              "do_eval: true; do_predict adds generation metrics to the perplexity it always "
                              "reports)")
        raise RecipeError("nothing to do: set 'dataset' to train, or 'eval_dataset' / 'val_size' / 'task' to "
                          "evaluate")
    base = model.plan(recipe)
    steps: list[Step] = [step for pair in train_pairs + eval_pairs for step in pair] + [base]
    tokenized = None
    if train_pairs or has_eval:
        tokenized = tokenize.plan(recipe, [a for _, a in train_pairs], [a for _, a in eval_pairs], base)
        steps.append(tokenized)
    scored = {"base": base}
    shipped_quantized = prequantized_method(base, store)
    if shipped_quantized:
        check_unmerged(recipe, shipped_quantized)
    if recipe.finetuning.do_train:
        check_prequantized(shipped_quantized, recipe.finetuning.finetuning_type, recipe.model.quantization_bit)
        loaded = base  # what the trainer loads: the quantized checkpoint for QLoRA
        if recipe.model.quantization_bit:
            loaded = quantize.plan(recipe, base, training_precision(recipe.finetuning.pure_bf16, recipe.training.bf16,
                                                                    recipe.training.fp16))
            steps.append(loaded)
        upstream, trained = trainer_step(recipe, tokenized, base, store, chain, loaded)
        check_trainable(lambda: model_structure(base, store), trained.config.lora, trained.config.freeze)
        steps = upstream + steps + [trained]
        if trained.stage.name != "reward" and not shipped_quantized:  # an rm scores its own pairwise accuracy
            start = next((s for s in upstream if s.label == trained.inputs.get("adapter")), None)
            merged = merge.plan(recipe, base, trained, start)
            steps.append(merged)
            if recipe.export.export_dir:
                steps.append(export.plan(recipe, merged))
            scored["tuned"] = merged
    elif recipe.model.adapter_name_or_path:  # nothing trained: what is scored is the base with that adapter
        upstream, merged = with_adapter(recipe, base, store, chain)
        steps = upstream + steps + [merged]
        if recipe.export.export_dir:  # exported as `tunefactory export` would
            steps.append(export.plan(recipe, merged))
        scored = {"tuned": merged}
    elif recipe.export.export_dir:  # nothing trained or merged: the base re-saved, as `tunefactory export` does
        steps.append(export.plan(recipe, base))
    if recipe.evaluation.do_eval and has_eval:
        steps += [evaluate.plan(recipe, tokenized, target, role) for role, target in scored.items()]
    if recipe.evaluation.task:
        steps += [exam.plan(recipe, target, role) for role, target in scored.items()]
    check_targets(recipe)
    if data.overwrite_cache:
        steps = [replace(s, force=True) if s.stage.name in DATA_STAGES else s for s in steps]
    return Plan(tuple(deduplicated(steps)))


def plan_export(recipe: Recipe, store: ArtifactStore | None = None) -> Plan:
    """What `tunefactory export` runs: a recipe that trains exports its trained model (its stages run or reused);
    else the base model, merged with adapter_name_or_path when given (a folder, an artifact, or the recipe that
    trains it), re-saved as export_size / export_legacy_format ask, with the
    recipe's template as its tokenizer's chat template."""
    if not recipe.export.export_dir:
        raise RecipeError("key 'export_dir' is required to export")
    if recipe.finetuning.do_train and recipe.data.dataset:  # the recipe trains: export what it trains
        if recipe.finetuning.stage == "rm":
            raise RecipeError("stage rm trains a reward model, which scores replies: there is no model to export "
                              "(set do_train: false to export the base with adapter_name_or_path)")
        full = plan_run(recipe, store)
        return full.upstream_of(full.of_stage("export")[0].label)
    base = model.plan(recipe)
    steps, target = [base], base
    if recipe.model.adapter_name_or_path:
        upstream, target = with_adapter(recipe, base, store, ())
        steps = upstream + steps + [target]
    steps.append(export.plan(recipe, target))
    check_target("export_dir", Path(recipe.export.export_dir), recipe.training.overwrite_output_dir)
    return Plan(tuple(deduplicated(steps)))


def with_adapter(recipe: Recipe, base: Step, store: ArtifactStore | None, chain: tuple[str, ...]
                 ) -> tuple[list[Step], Step]:
    """(the steps that provide adapter_name_or_path, then it), and the base merged with it."""
    start, upstream = resolve(recipe.model.adapter_name_or_path, "adapter_name_or_path", "adapter", store,
                              lambda up, path: list(plan_run(up, store, (*chain, path)).steps), chain)
    same_base(base, upstream, "adapter_name_or_path")
    return upstream + [start], merge.plan(recipe, base, start)


def check_unmerged(recipe: Recipe, method: str) -> None:
    """A model that ships quantized (GPTQ, AWQ, ...) trains adapters that cannot be merged into it (PEFT refuses,
    as LlamaFactory's export does): its run scores the base only, serving loads base and adapter, and what would
    merge is refused by key."""
    if recipe.export.export_dir and (recipe.finetuning.do_train or recipe.model.adapter_name_or_path):
        raise RecipeError(f"key 'export_dir': the model is already quantized ({method}), and an adapter cannot be "
                          "merged into quantized weights; export from the full-precision model")
    if recipe.finetuning.create_new_adapter:
        raise RecipeError(f"key 'create_new_adapter': the model is already quantized ({method}), and the adapter "
                          "cannot be merged into it; drop create_new_adapter to continue training that adapter")
    if recipe.model.adapter_name_or_path and not recipe.finetuning.do_train:
        raise RecipeError(f"key 'adapter_name_or_path': the model is already quantized ({method}); scoring it with "
                          "an adapter needs the adapter merged, which quantized weights do not allow")


def prequantized_method(model_step: Step, store: ArtifactStore | None = None) -> str | None:
    """The quantization a model ships with (GPTQ, AWQ, ...): from a local folder's config.json, an imported
    model's manifest, or the hub's config.json at the resolved commit (None where it cannot be read: offline,
    the model stage then refuses what it cannot do); a GGUF file is dequantized on import."""
    config, where = model_step.config, model_step.locators
    if config.source_kind == "local":
        return prequantized(model.read_config(Path(where["path"])))
    found = imported_model(model_step, store)
    if found is not None:
        return found.info.get("prequantized")
    if config.source_kind != "hub":
        return None
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(where["path"], "config.json", revision=config.source.rsplit("@", 1)[-1])
        return prequantized(json.loads(Path(file).read_text(encoding="utf-8")))
    except Exception:  # offline, or no config.json: the import finds out
        return None


def trainer_step(recipe: Recipe, tokenized: Step, base: Step, store: ArtifactStore | None,
                 chain: tuple[str, ...], loaded: Step | None = None) -> tuple[list[Step], Step]:
    """The objective's training step (on `loaded`, the base or its quantized checkpoint), and the steps of
    what it starts from (adapter_name_or_path), scores with (reward_model) or compares to (ref_model)."""
    loaded = loaded or base
    def upstream_plan(upstream: Recipe, path: str) -> list[Step]:
        return list(plan_run(upstream, store, (*chain, path)).steps)

    objective, rlhf = recipe.finetuning.stage, recipe.rlhf
    upstream: list[Step] = []
    start = None
    if recipe.model.adapter_name_or_path:
        start, steps = resolve(recipe.model.adapter_name_or_path, "adapter_name_or_path", "adapter", store,
                               upstream_plan, chain)
        same_base(base, steps, "adapter_name_or_path")
        upstream += steps + [start]
    if objective in ("pt", "sft"):
        return upstream, train.plan(recipe, tokenized, loaded, start)
    if objective == "rm":
        return upstream, reward.plan(recipe, tokenized, loaded, start)
    if objective in ("dpo", "kto"):
        reference = None
        if rlhf.ref_model:
            reference = replace(model.plan(recipe.replace(model_name_or_path=rlhf.ref_model, gguf_file=None)),
                                label="model[ref]")
            upstream.append(reference)
        return upstream, preference.plan(recipe, tokenized, loaded, start, reference)
    scorer, steps = resolve(rlhf.reward_model, "reward_model", "reward_model", store, upstream_plan, chain)
    same_base(base, steps, "reward_model")
    policy = ppo.plan(recipe, tokenized, loaded, scorer, start)
    if rlhf.reward_model_type == "lora":
        same_adapter_base(policy, scorer, [*upstream, *steps, scorer])
    return upstream + steps + [scorer], policy


def check_targets(recipe: Recipe) -> None:
    """output_dir / export_dir must be folders TuneFactory may write into (see flows.user_output), apart from each
    other, and export_dir is refused where nothing can be exported rather than left unwritten."""
    overwrite = recipe.training.overwrite_output_dir
    output_dir = recipe.training.output_dir if recipe.finetuning.do_train else None
    export_dir = recipe.export.export_dir
    if export_dir and recipe.finetuning.do_train and recipe.finetuning.stage == "rm":
        raise RecipeError("key 'export_dir': stage rm trains a reward model, which scores replies: there is no model "
                          "to export")
    if output_dir and export_dir and overlapping(Path(output_dir), Path(export_dir)):
        raise RecipeError(f"keys 'output_dir' and 'export_dir': {output_dir} and {export_dir} overlap, and each "
                          "folder holds one result (the adapter, the exported model); choose two apart")
    if output_dir:
        check_target("output_dir", Path(output_dir), overwrite)
    if export_dir:
        check_target("export_dir", Path(export_dir), overwrite)
    if recipe.evaluation.save_dir and recipe.evaluation.task:  # each model's report goes into its own folder
        save_dir = Path(recipe.evaluation.save_dir)
        check_target("save_dir", save_dir, overwrite=True)  # a folder (the user's other files are left alone)
        for role in ("base", "tuned"):
            check_target("save_dir", save_dir / role, overwrite)


def overlapping(a: Path, b: Path) -> bool:
    """Whether one folder is the other or inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


@dataclass(frozen=True)
class PlannedStep:
    """A step as the store sees it now: its key once its inputs exist, and whether it is cached."""

    step: Step
    key: str | None  # None until every input is built
    cached: bool
    waits_for: str | None  # the first input that must be built first


def describe(plan: Plan, store: ArtifactStore) -> list[PlannedStep]:
    """Each step's key and cache status against the store, in plan order (what --dry-run prints)."""
    refs: dict[str, ArtifactRef | None] = {}
    out = []
    for step in plan:
        inputs = {name: refs[label] for name, label in step.inputs.items()}
        missing = next((label for label in step.inputs.values() if refs[label] is None), None)
        if missing is not None:
            refs[step.label] = None
            out.append(PlannedStep(step, None, False, missing))
            continue
        key = step.stage.key(step.config, inputs)
        found = None if step.force else store.lookup(step.stage.name, key)
        refs[step.label] = found.ref if found else None
        out.append(PlannedStep(step, key, found is not None, None))
    return out
