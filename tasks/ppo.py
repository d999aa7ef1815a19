"""PPO stage: RLHF with one base model in memory (LlamaFactory's model sharing).

On one copy of the base sit the policy's LoRA adapter ("default", started from an sft adapter when
given), the reward model's adapter ("reward", from an rm artifact) and two heads: the reward head and
the critic (value) head. The reference is the base with adapters disabled. Switching is PEFT's
`set_adapter` / `disable_adapter`. A `full` reward model is loaded as a separate classifier instead.

Each step: sample replies to a batch of prompts, score them with the reward model, take the policy's
and the reference's log-probs and the critic's values, shape per-token rewards with a KL penalty,
compute GAE advantages, then run `ppo_epochs` of clipped policy and value updates (tasks.ppo_math,
ported from TRL 0.9.6's PPOTrainer, which TRL 1.x no longer has). Every `save_steps` the loop's whole state
is checkpointed in the staging folder, and a re-run of a killed ppo run resumes from the newest complete
checkpoint, as the Trainer-run stages do (tasks.ppo_checkpoints; LlamaFactory's PPO cannot resume).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from tasks.core.hardware import place_on_compute_device
from tasks.core.loading import remote_code
from tasks.core.recipe import Recipe
from tasks.core.stage import BuildContext, Built, Stage, Step
from tasks.quantization import QuantSettings
from tasks.reward import VALUE_HEAD
from tasks.rows import load_rows
from tasks.train_common import (
    REPORTS,
    TrainingConfig,
    resume_point,
    training_locators,
    training_values,
    write_history,
    write_results,
)
from tasks.train_methods import (
    attach_trainable,
    cast_frozen_weights_for_autocast,
    grown_vocabulary,
    load_base,
    starting_adapter,
)

POLICY, REWARD = "default", "reward"


class PPOSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    buffer_size: int
    epochs: int
    score_norm: bool
    target_kl: float
    whiten_rewards: bool
    init_kl_coef: float = 0.2  # TRL 0.9.6's defaults, as LlamaFactory used them
    horizon: int = 10_000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1


class Rollout(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_new_tokens: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    top_k: int | None
    repetition_penalty: float


class PPOConfig(TrainingConfig):
    objective: Literal["ppo"] = "ppo"
    ppo: PPOSettings
    rollout: Rollout
    reward_type: Literal["lora", "full"]
    reward_quantization: QuantSettings | None  # a full reward model loaded in 4 or 8 bit


def plan(recipe: Recipe, tokenized: Step, model: Step, reward: Step, adapter: Step | None = None) -> Step:
    r, e = recipe.rlhf, recipe.evaluation
    settings = PPOSettings(buffer_size=r.ppo_buffer_size, epochs=r.ppo_epochs, score_norm=r.ppo_score_norm,
                           target_kl=r.ppo_target, whiten_rewards=r.ppo_whiten_rewards)
    rollout = Rollout(max_new_tokens=e.max_new_tokens, do_sample=e.do_sample,
                      temperature=e.temperature if e.do_sample else None, top_p=e.top_p if e.do_sample else None,
                      top_k=e.top_k if e.do_sample else None, repetition_penalty=e.repetition_penalty)
    bits = r.reward_model_quantization_bit if r.reward_model_type == "full" else None
    quant = QuantSettings.of(bits, recipe.model)
    config = PPOConfig(**training_values(recipe), ppo=settings, rollout=rollout, reward_type=r.reward_model_type,
                       reward_quantization=quant)
    inputs = {"data": tokenized, "model": model, "reward": reward, **({"adapter": adapter} if adapter else {})}
    return STAGE.step("ppo", config, inputs, training_locators(recipe))


def build(config: PPOConfig, ctx: BuildContext, out: Path) -> Built:
    from safetensors.torch import save_file

    from tasks.lean_training import flat_batches_supported, restore_attention, use_varlen_attention
    from tasks.ppo_loop import SharedModel, linear_head, reward_parts, train_ppo

    data = ctx.inputs["data"]
    model = attach_trainable(load_base(ctx.inputs["model"].part("model"), config, **remote_code(ctx.inputs["model"])),
                             config, starting_adapter(ctx), train_embeddings=grown_vocabulary(ctx))
    if config.gradient_checkpointing:  # as the Trainer stages: the update passes recompute activations
        model.gradient_checkpointing_enable()
    reward_head, classifier = reward_parts(ctx, config, model)
    cast_frozen_weights_for_autocast(model, config)  # the reward adapter's weights too: they are frozen here
    place_on_compute_device(model)  # this loop is not the Trainer's: nothing else moves it to the GPU
    critic = linear_head(reward_head.weight.detach(), trainable=True,  # the critic starts as the reward head
                         bias=reward_head.bias.detach() if reward_head.bias is not None else None)
    flat = flat_batches_supported(model)  # scoring and the policy's passes on unpadded rows
    if flat:
        use_varlen_attention(model)
    generation = json.loads(data.part("generation").read_text())
    shared = SharedModel(model, critic, reward_head, classifier, config.precision, flat=flat,
                         pad_id=generation["pad_token_id"])  # the rm scores where a classifier pools

    def report(entry: dict[str, float]) -> None:
        if entry["step"] % config.logging_steps == 0:
            ctx.log_metrics({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])
            ctx.log.info("ppo step %d: reward %.3f, kl %.3f, loss %.3f", entry["step"], entry["reward"], entry["kl"],
                         entry["loss"])

    resume = resume_point(config, ctx)
    resumed_step = json.loads((resume / "trainer_state.json").read_text())["global_step"] if resume else 0
    started = time.monotonic()
    history = train_ppo(shared, load_rows(data.part("train"))["input_ids"], config, generation, report,
                        checkpoints=ctx.staging, resume=resume)
    seconds = time.monotonic() - started
    restore_attention(model)
    model.save_pretrained(str(out / "adapter"), selected_adapters=[POLICY])
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(ctx.inputs["model"].part("model")), **remote_code(ctx.inputs["model"])
                                  ).save_pretrained(str(out / "adapter"))
    save_file({name: value.detach().cpu().contiguous() for name, value in critic.state_dict().items()},
              str(out / VALUE_HEAD))
    write_history(history, out)
    quarter = max(1, len(history) // 4)
    summary = {"global_step": len(history), "train_seconds": round(seconds, 2),  # this process's share
               "resumed_from_step": resumed_step,
               "reward_first_quarter": sum(h["reward"] for h in history[:quarter]) / quarter,
               "reward_last_quarter": sum(h["reward"] for h in history[-quarter:]) / quarter,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    write_results(summary, ctx, out, history, config.plot_loss)
    return Built("adapter", {"adapter": "adapter", "value_head": VALUE_HEAD, **REPORTS}, summary,
                 reports=tuple(REPORTS))


STAGE = Stage(
    name="ppo",
    plan=plan,
    build=build,
    code=("tasks.ppo", "tasks.ppo_loop", "tasks.ppo_math", "tasks.ppo_checkpoints", "tasks.train_checkpoints",
          "tasks.reward", "tasks.train_common", "tasks.train_methods", "tasks.quantization",
          "tasks.core.mapped_weights", "tasks.eval_passes", "tasks.lean_training", "tasks.varlen_attention"),
    libraries=("torch", "transformers", "peft", "safetensors"),
    heavy=True,
)
