"""Every example recipe validates and plans (chained ones with their upstream recipes)."""

from pathlib import Path

import pytest

from flows.plan import plan_run
from tasks.core.recipe import load_recipe
from tests.conftest import REPO

EXAMPLES = sorted((REPO / "configs" / "examples").glob("*.yaml"))


def test_there_is_an_example_per_stage_and_loss():
    names = {path.stem for path in EXAMPLES}
    assert {"pt_lora", "sft_lora", "rm_lora", "dpo_lora", "kto_lora", "ppo_lora"} <= names
    assert {f"dpo_{loss}_lora" for loss in ("hinge", "ipo", "kto_pair", "orpo", "simpo")} <= names
    methods = {"loraplus", "pissa", "lora_additional_target", "lora_new_adapter", "lora_neftune", "freeze_modules",
               "full_galore", "full_galore_layerwise", "full_apollo", "full_badam", "full_adam_mini", "full_muon",
               "full_pure_bf16", "full_ds_z2", "lora_ds_z3"}
    assert {f"sft_{method}" for method in methods} | {"dpo_lora_ds_z2"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_plans(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)  # chained recipes name their upstream recipes relative to the repository
    plan = plan_run(load_recipe(path))
    objective = load_recipe(path).finetuning.stage
    trainer = {"pt": "train", "sft": "train", "rm": "reward", "dpo": "preference", "kto": "preference",
               "ppo": "ppo"}[objective]
    assert any(step.stage.name == trainer and ":" not in step.label for step in plan)
    if objective == "ppo":
        assert {"sft_lora:train", "rm_lora:reward"} <= set(plan.labels())
