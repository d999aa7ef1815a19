"""Training on several ranks: the train task launches torchrun (2 CPU ranks over gloo, DeepSpeed's CPU accelerator)
and collects the artifact; the loss curve matches a one-rank run with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tasks.core.stage import run_in_process
from tasks.core.store import ArtifactStore
from tasks.launch import torchrun_command
from tests.conftest import REPO, tiny_recipe_values
from tests.test_methods import plan_train

TOLERANCE = 1e-3  # per logged step, absolute, on losses near 6.4: the ranks only reorder float sums
DEEPSPEED = REPO / "configs" / "deepspeed"


def run(store, model_dir, **overrides):
    values = tiny_recipe_values(model_dir, **{"max_steps": 6, "logging_steps": 1, "save_steps": 100,
                                             "learning_rate": 5e-3, "finetuning_type": "full", **overrides})
    refs = run_in_process(plan_train(values), store)
    artifact = ArtifactStore(store).open(refs["train"])
    history = json.loads(artifact.part("log_history").read_text())
    return artifact, [e["loss"] for e in history if "loss" in e]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_model_dir):
    store = tmp_path_factory.mktemp("one-rank")
    return store, run(store, tiny_model_dir, per_device_train_batch_size=4)


@pytest.mark.parametrize("zero", ["ds_z2_config.json", "ds_z3_config.json"])
def test_two_ranks_match_one(one_rank, tiny_model_dir, monkeypatch, zero):
    store, (single, single_losses) = one_rank
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    artifact, losses = run(store, tiny_model_dir, per_device_train_batch_size=2, nproc_per_node=2,
                           deepspeed=str(DEEPSPEED / zero))
    assert len(losses) == len(single_losses) == 6
    gap = max(abs(a - b) for a, b in zip(losses, single_losses, strict=True))
    print(f"{zero}: 2 ranks {[round(x, 5) for x in losses]}, 1 rank {[round(x, 5) for x in single_losses]}, "
          f"largest gap {gap:.2e}")
    assert gap < TOLERANCE, (losses, single_losses)
    results = json.loads(artifact.part("results").read_text())
    assert results["global_step"] == 6 and results["optimizer"] == "torch.optim.adamw.AdamW"
    ours = load_file(str(artifact.part("model") / "model.safetensors"))
    theirs = load_file(str(single.part("model") / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-3  # the same weights, gathered


def test_launcher_command(tiny_model_dir):
    from tasks.core.recipe import Recipe
    from tasks.train import plan

    class Step:
        label, locators = "upstream", {"sources": {}}

    recipe = Recipe.from_flat(tiny_recipe_values(tiny_model_dir, nproc_per_node=4, nnodes=2, node_rank=1,
                                                 master_addr="10.0.0.1", master_port=29400))
    config = plan(recipe, Step(), Step()).config
    command = torchrun_command(config, REPO / "request.pkl")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1",
            "--master_port=29400"} <= set(command)
    assert config.launch.world_size == 8
    assert torch.distributed.is_available()
