"""PPO's checkpoints: the loop's whole state every `save_steps`, so a killed ppo run resumes where it was.

A checkpoint holds the files a Trainer checkpoint holds, so the trainer stages' completeness check
(tasks.train_checkpoints) and `resume_from_checkpoint` take it as it is:
- trainer_state.json: the step and each step's figures so far;
- adapter_model.safetensors (and adapter_config.json): the policy's adapter, loadable by PEFT on its own;
- optimizer.pt: the optimizer's and the gradient scaler's state, the critic's weights, the KL coefficient, the score
  moments, the random states and the prompts left in the current pass;
- scheduler.pt: the learning-rate schedule.
It is written to a hidden folder and renamed into place, so a run killed while saving leaves no checkpoint-N.
A resumed run continues as the uninterrupted one would have: the same rollouts, updates and figures.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tasks.core.errors import RecipeError
from tasks.ppo import POLICY
from tasks.ppo_math import AdaptiveKLController, RunningMoments
from tasks.train_checkpoints import CHECKPOINT_PREFIX, numbered_checkpoints


@dataclass
class LoopState:
    """What PPO's steps change besides the trained weights."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # a torch LR scheduler
    scaler: torch.amp.GradScaler
    kl_control: AdaptiveKLController
    moments: RunningMoments
    rng: random.Random  # the prompts' shuffling and the mini-batches' order
    order: list[int] = field(default_factory=list)  # the prompts left in this pass, in their shuffled order
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(staging: Path, step: int, shared, loop: LoopState, keep: int | None) -> Path:
    """checkpoint-<step> under staging, complete or not at all; then only the newest `keep` are kept."""
    final = staging / f"{CHECKPOINT_PREFIX}{step}"
    partial = staging / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shared.model.save_pretrained(str(partial), selected_adapters=[POLICY])
    state = {
        "optimizer": loop.optimizer.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "critic": {name: value.detach().cpu() for name, value in shared.critic.state_dict().items()},
        "kl_coef": loop.kl_control.value,
        "moments": [loop.moments.mean, loop.moments.var, loop.moments.std, loop.moments.count],
        "rng": loop.rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "order": loop.order,
    }
    torch.save({"ppo": state}, partial / "optimizer.pt")
    torch.save(loop.scheduler.state_dict(), partial / "scheduler.pt")
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": loop.history}))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    if keep:
        for old in numbered_checkpoints(staging)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(path: Path, shared, loop: LoopState) -> int:
    """Put a checkpoint's state back into the model, the critic and the loop; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "ppo" not in saved:
        raise RecipeError(f"key 'resume_from_checkpoint': {path} is not a ppo checkpoint")
    state = saved["ppo"]
    weights = load_file(str(path / "adapter_model.safetensors"), device=str(shared.device))
    set_peft_model_state_dict(shared.model, weights, adapter_name=POLICY)
    shared.critic.load_state_dict(state["critic"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    loop.kl_control.value = state["kl_coef"]
    loop.moments.mean, loop.moments.var, loop.moments.std, loop.moments.count = state["moments"]
    loop.rng.setstate(state["rng"])
    loop.order = list(state["order"])
    progress = json.loads((path / "trainer_state.json").read_text())
    loop.history = progress["log_history"]
    torch.set_rng_state(state["torch_rng"])  # last: loading above may draw random numbers
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(progress["global_step"])
