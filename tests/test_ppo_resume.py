"""PPO's checkpoints: a killed ppo run resumes from its newest complete checkpoint and ends as the uninterrupted
run does (the loop on the synthetic task), and the ppo stage resumes a killed build from its staging folder."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from flows.cli import main
from tasks import ppo_loop
from tasks.core.errors import RecipeError
from tasks.core.recipe import Recipe
from tasks.train_checkpoints import checkpoint_problem
from tests.conftest import tiny_recipe_values
from tests.test_rlhf import PAIRS, SYNTHETIC_GENERATION, SYNTHETIC_PROMPTS, synthetic_ppo


class Killed(Exception):
    pass


def killed_at(step: int):
    def on_step(entry):
        if entry["step"] == step:
            raise Killed

    return on_step


def test_a_killed_ppo_loop_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Killed after step 5 of 6 with save_steps 2 and save_total_limit 1: checkpoint-4 alone is left, complete by the
    Trainer stages' check and loadable by PEFT; resumed from it, step 6 and the weights are the uninterrupted run's
    (sampled replies, score moments, KL coefficient, optimizer and schedule all carried over)."""
    config, fresh = synthetic_ppo(tiny_model_dir, tmp_path / "model", score_norm=True, max_steps=6, save_steps=2,
                                  save_total_limit=1, lr_scheduler_type="linear")
    whole = fresh()
    expected = ppo_loop.train_ppo(whole, SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION)

    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(Killed):
        ppo_loop.train_ppo(fresh(), SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION, killed_at(5), checkpoints=staging)
    assert [p.name for p in staging.iterdir()] == ["checkpoint-4"]
    checkpoint = staging / "checkpoint-4"
    assert checkpoint_problem(checkpoint, save_only_model=False) is None
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), str(checkpoint))

    resumed_model = fresh()
    seen = []
    resumed = ppo_loop.train_ppo(resumed_model, SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION, seen.append,
                                 checkpoints=staging, resume=checkpoint)
    assert [entry["step"] for entry in seen] == [5, 6]  # only the steps this run made
    assert len(resumed) == len(expected) == 6
    for ours, theirs in zip(resumed, expected, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)
    assert len({entry["kl_coef"] for entry in expected}) == 6 and expected[-1]["learning_rate"] < config.learning_rate
    theirs, ours = get_peft_model_state_dict(whole.model), get_peft_model_state_dict(resumed_model.model)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    assert torch.allclose(resumed_model.critic.weight, whole.critic.weight, atol=1e-6)


def test_a_trainer_checkpoint_is_not_a_ppo_checkpoint(tiny_model_dir, tmp_path):
    config, fresh = synthetic_ppo(tiny_model_dir, tmp_path / "model", max_steps=3, save_steps=1)
    staging = tmp_path / "staging"
    staging.mkdir()
    ppo_loop.train_ppo(fresh(), SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION, checkpoints=staging)
    checkpoint = staging / "checkpoint-1"
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")  # what a Trainer writes there
    with pytest.raises(RecipeError, match="checkpoint-1 is not a ppo checkpoint"):
        ppo_loop.train_ppo(fresh(), SYNTHETIC_PROMPTS, config, SYNTHETIC_GENERATION, resume=checkpoint)


def test_save_only_model_does_not_apply_to_ppo(tiny_model_dir):
    with pytest.raises(RecipeError, match="key 'save_only_model' does not apply to stage ppo"):
        Recipe.from_flat(tiny_recipe_values(tiny_model_dir, stage="ppo", reward_model="rm.yaml", save_only_model=True))


def test_a_killed_ppo_stage_resumes_from_its_staging_folder(write_recipe, workdir, monkeypatch):
    common = {"max_samples": 8, "per_device_train_batch_size": 4, "max_new_tokens": 3, "logging_steps": 1}
    rm = write_recipe("rm.yaml", stage="rm", max_steps=2, **PAIRS, **common)
    recipe = write_recipe("ppo.yaml", stage="ppo", reward_model=str(rm), max_steps=4, save_steps=2, **common)
    train_ppo = ppo_loop.train_ppo
    monkeypatch.setattr(ppo_loop, "train_ppo", lambda *args, **kwargs: train_ppo(*args[:4], killed_at(3), **kwargs))
    with pytest.raises(Killed):
        main(["run", str(recipe)])
    staging = workdir / "artifacts" / ".staging" / "ppo"
    assert [p.name for p in staging.glob("*/checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(ppo_loop, "train_ppo", train_ppo)
    assert main(["run", str(recipe)]) == 0
    (folder,) = (workdir / "artifacts" / "ppo").glob("[0-9a-f]*")
    results = json.loads((folder / "train_results.json").read_text())
    assert results["resumed_from_step"] == 2 and results["global_step"] == 4
    assert [entry["step"] for entry in json.loads((folder / "log_history.json").read_text())] == [1, 2, 3, 4]
    assert not list(staging.glob("*/checkpoint-*"))  # the staging folder goes once the artifact is published
