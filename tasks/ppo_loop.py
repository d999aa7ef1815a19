"""The PPO loop of the ppo stage (tasks.ppo): rollouts, rewards, the KL-shaped advantages and the clipped updates,
on one shared base model whose adapters are switched for policy, reference and reward (see tasks.ppo).

Kept apart from the stage's plan so that planning a recipe, which imports every stage, does not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from tasks.core.errors import RecipeError
from tasks.core.hardware import place_on_compute_device
from tasks.core.loading import remote_code
from tasks.core.stage import BuildContext, check_stop
from tasks.eval_passes import left_padded
from tasks.lean_training import bucketed_inputs, sample_bounds
from tasks.ppo import POLICY, REWARD, PPOConfig, PPOSettings, Rollout
from tasks.ppo_checkpoints import LoopState, restore_checkpoint, save_checkpoint
from tasks.ppo_math import (
    AdaptiveKLController,
    RunningMoments,
    advantages_and_returns,
    kl_penalized_rewards,
    normalize_scores,
    ppo_losses,
)
from tasks.quantization import quantized_loading


def load_reward_adapter(model, reward_dir: Path) -> None:
    """The rm artifact's LoRA weights as a second adapter of the policy's model (its classifier head is kept
    apart, in value_head.safetensors)."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    settings = json.loads((reward_dir / "adapter_config.json").read_text())
    lora = LoraConfig(task_type="CAUSAL_LM", r=settings["r"], lora_alpha=settings["lora_alpha"],
                      target_modules=settings["target_modules"], use_dora=settings.get("use_dora", False),
                      use_rslora=settings.get("use_rslora", False))
    weights = {k: v for k, v in load_file(str(reward_dir / "adapter_model.safetensors")).items() if ".score." not in k}
    whole = sorted({k.split(".modules_to_save.")[0] for k in weights if "lora_" not in k})
    if whole:  # the rm also trained these whole (additional_target, a grown vocabulary): they are not the policy's
        raise RecipeError(f"key 'reward_model': the LoRA reward model also trained whole modules ({whole[:3]}), which "
                          "an adapter on the policy's shared base cannot hold; use reward_model_type: full")
    model.add_adapter(REWARD, lora)
    result = set_peft_model_state_dict(model, weights, adapter_name=REWARD)
    missing = [k for k in result.unexpected_keys if "lora" in k]
    if missing:
        raise RecipeError(f"key 'reward_model': its adapter does not fit this base model ({missing[:3]})")
    for name, param in model.named_parameters():
        if f".{REWARD}." in name:
            param.requires_grad = False
    model.set_adapter(POLICY)


def linear_head(weight: torch.Tensor, trainable: bool, bias: torch.Tensor | None = None) -> torch.nn.Linear:
    """A one-output head from its weight (and bias: an imported TRL value head has one; ours have none)."""
    head = torch.nn.Linear(weight.shape[1], 1, bias=bias is not None)
    head.weight.data.copy_(weight.float())
    if bias is not None:
        head.bias.data.copy_(bias.float().reshape(1))
    head.requires_grad_(trainable)
    return head


def forward_precision(precision: str, device_type: str):
    """The context the loop's forward passes run in: autocast under bf16/fp16 mixed precision, as accelerate
    gives the Trainer-run stages (this loop is TuneFactory's own); none in fp32 or pure_bf16, where the
    weights' own dtype is the compute dtype."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return functools.partial(torch.autocast, device_type, dtype=dtype)
    return contextlib.nullcontext


class SharedModel:
    """The policy, critic, reward model and reference on one base: forward passes under the right adapter, in
    the training's precision, on the model's device (the heads join it there). The one-output heads (critic,
    reward) run in fp32 outside autocast: they cost nothing, and PPO's advantages and score normalisation read
    their outputs. Where `flat`, the backbone runs a batch's real tokens as one unpadded row (see `hidden`)."""

    def __init__(self, model, critic, reward_head, reward_classifier=None, precision: str = "fp32",
                 flat: bool = False, pad_id: int | None = None):
        self.device, self.flat, self.pad_id = next(model.parameters()).device, flat, pad_id
        self.model, self.critic = model, critic.to(self.device)
        self.reward_head = reward_head.to(self.device) if reward_head is not None else None
        self.reward_classifier = reward_classifier
        base = model.get_base_model()
        self.backbone, self.lm_head = base.base_model, base.get_output_embeddings()
        self.autocast = forward_precision(precision, self.device.type)

    def hidden(self, ids, mask):
        """The backbone's last hidden states of right-padded rows. Flat: the real tokens laid end to end as one
        row, attended sequence by sequence, as the sft stage trains (tasks.lean_training), then put back in
        the rows' layout with zeros at the pads, which every reader masks out. A rollout batch's replies end
        anywhere up to max_new_tokens, so its padded rows are a good part padding."""
        with self.autocast():
            if not self.flat:
                return self.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            real = mask.bool()
            row = {"input_ids": ids[real][None], "position_ids": (mask.cumsum(-1) - 1)[real][None]}
            row = bucketed_inputs(row)
            states = self.backbone(**row, **sample_bounds(row["position_ids"]), use_cache=False).last_hidden_state
            return states.new_zeros(*ids.shape, states.shape[-1]).masked_scatter(real[..., None],
                                                                                  states[0, : int(real.sum())])

    def logprobs_and_values(self, ids, mask, response, with_values: bool = True):
        """Log-prob of each next token and the critic's value of each state, for positions 0..T-2. The output
        head runs only where `response` marks a position that predicts a reply token (the only log-probs PPO
        reads): the full-vocabulary logits of the prompt and pad positions are never computed; 0 there."""
        states, keep = self.hidden(ids, mask)[:, :-1], response.bool()
        with self.autocast():
            logits = self.lm_head(states[keep]).float()
        kept = torch.gather(logits.log_softmax(-1), 1, ids[:, 1:][keep].unsqueeze(-1)).squeeze(-1)
        logprobs = kept.new_zeros(keep.shape).masked_scatter(keep, kept)
        values = self.critic(states.float()).squeeze(-1) if with_values else None
        return logprobs, values

    @torch.no_grad()
    def reference_logprobs(self, ids, mask, response):
        with self.model.disable_adapter():
            return self.logprobs_and_values(ids, mask, response, with_values=False)[0]

    @torch.no_grad()
    def scores(self, ids, mask):
        """The reward model's score of each whole sequence: its head on the token the rm stage trained it at, the
        last one that is not the pad token, as a classifier pools (where pad is EOS, the token before a closing
        EOS: the mask's last token was read before, a position the head never learned)."""
        index = torch.arange(ids.shape[1], device=ids.device)
        pooled = mask.bool() if self.pad_id is None else mask.bool() & (ids != self.pad_id)
        last = torch.where(pooled, index, 0).amax(-1)
        if self.reward_classifier is not None:
            with self.autocast():
                return self.reward_classifier(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
        self.model.set_adapter(REWARD)
        try:
            hidden = self.hidden(ids, mask)
        finally:
            self.model.set_adapter(POLICY)
        return self.reward_head(hidden[torch.arange(len(ids), device=ids.device), last].float()).squeeze(-1)


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def cut_reply(tokens: list[int], stops: set[int], pad_id: int) -> list[int]:
    """A sampled reply up to and including its first stop token; never empty."""
    reply = []
    for token in tokens:
        reply.append(token)
        if token in stops:
            break
    while len(reply) > 1 and reply[-1] == pad_id and pad_id not in stops:
        reply.pop()
    return reply


@torch.no_grad()
def sample_replies(shared: SharedModel, prompts: list[list[int]], rollout: Rollout, generation: dict[str, Any],
                   batch_size: int) -> list[list[int]]:
    """Replies of the policy to prompts, sampled in left-padded batches."""
    stops, pad_id = set(generation["stop_token_ids"]), generation["pad_token_id"]
    sampling = ({"do_sample": True, "temperature": rollout.temperature, "top_p": rollout.top_p,
                 "top_k": rollout.top_k} if rollout.do_sample else {"do_sample": False})
    replies = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_padded(prompts[start : start + batch_size], pad_id, shared.device)
        with shared.autocast():
            output = shared.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=rollout.max_new_tokens,
                                           repetition_penalty=rollout.repetition_penalty,
                                           eos_token_id=sorted(stops), pad_token_id=pad_id, **sampling)
        replies += [cut_reply(row.tolist(), stops, pad_id) for row in output[:, ids.shape[1]:]]
    return replies


def experience(shared: SharedModel, prompts, replies, pad_id: int, kl_coef: float, settings: PPOSettings,
               moments: RunningMoments) -> dict[str, torch.Tensor]:
    """One batch of rollouts as PPO's experience: tokens, masks, old log-probs and values, advantages, returns."""
    ids, mask = right_pad([p + r for p, r in zip(prompts, replies, strict=True)], pad_id, shared.device)
    response = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=shared.device)
    for row, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        response[row, len(prompt) - 1 : len(prompt) - 1 + len(reply)] = 1  # positions that predict a reply token
    raw_scores = shared.scores(ids, mask)
    scores = normalize_scores(raw_scores, moments) if settings.score_norm else raw_scores
    with torch.no_grad():
        logprobs, values = shared.logprobs_and_values(ids, mask, response)
    ref_logprobs = shared.reference_logprobs(ids, mask, response)
    rewards, kl = kl_penalized_rewards(logprobs, ref_logprobs, scores, response, kl_coef)
    advantages, returns = advantages_and_returns(values, rewards, response, settings.gamma, settings.lam,
                                                 settings.whiten_rewards)
    return {"ids": ids, "mask": mask, "response": response, "logprobs": logprobs, "values": values,
            "advantages": advantages, "returns": returns, "scores": raw_scores,
            "kl": (kl * response).sum(-1).mean()}


def optimize(shared: SharedModel, batch: dict[str, torch.Tensor], config: PPOConfig, optimizer,
             parameters: list[torch.nn.Parameter], rng: random.Random, scaler) -> dict[str, float]:
    """ppo_epochs passes over the experience in mini-batches, stepping every gradient_accumulation_steps. The
    gradient scaler is active under fp16 only (bf16 has fp32's range)."""
    size, step_every = config.batch_size, config.gradient_accumulation_steps
    stats: dict[str, list[float]] = {"loss": [], "policy_loss": [], "value_loss": [], "clipfrac": []}
    order = list(range(len(batch["ids"])))
    for _ in range(config.ppo.epochs):
        rng.shuffle(order)
        for number, start in enumerate(range(0, len(order), size)):
            rows = torch.tensor(order[start : start + size], device=shared.device)
            logprobs, values = shared.logprobs_and_values(batch["ids"][rows], batch["mask"][rows],
                                                          batch["response"][rows])
            losses = ppo_losses(logprobs, batch["logprobs"][rows], values, batch["values"][rows],
                                batch["advantages"][rows], batch["returns"][rows], batch["response"][rows],
                                config.ppo.cliprange, config.ppo.cliprange_value, config.ppo.vf_coef)
            scaler.scale(losses["loss"] / step_every).backward()
            if (number + 1) % step_every == 0 or start + size >= len(order):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
            for key in stats:
                stats[key].append(losses[key].item())  # ppo_losses returns tensors only
    return {key: sum(values) / len(values) for key, values in stats.items()}


def total_steps(config: PPOConfig, prompts: int, rollout_batch: int) -> int:
    if config.schedule.max_steps:
        return config.schedule.max_steps
    return max(1, math.ceil(config.schedule.epochs * math.ceil(prompts / rollout_batch)))


def reward_parts(ctx: BuildContext, config: PPOConfig, shared_model):
    """The reward head (model sharing) or a separate reward classifier (reward_model_type: full)."""
    from safetensors.torch import load_file

    reward = ctx.inputs["reward"]
    stored = load_file(str(reward.part("value_head")))
    head = linear_head(stored["weight"], trainable=False, bias=stored.get("bias"))
    if config.reward_type == "lora":
        if reward.info.get("weights") != "adapter":
            raise RecipeError("key 'reward_model_type': lora needs a LoRA reward model; this one has full weights "
                              "(use reward_model_type: full)")
        load_reward_adapter(shared_model, reward.part("adapter"))
        return head, None
    from transformers import AutoModelForSequenceClassification

    if reward.info.get("weights") != "model":
        raise RecipeError("key 'reward_model_type': full needs a reward model with whole weights (trained with "
                          "finetuning_type full or freeze); this one is a LoRA adapter (use reward_model_type: lora)")
    kwargs = {**remote_code(ctx.inputs["model"]),  # a full reward model is trained from this same base
              **quantized_loading(config.reward_quantization, config.precision)}
    classifier = AutoModelForSequenceClassification.from_pretrained(str(reward.part(reward.info["weights"])), **kwargs)
    place_on_compute_device(classifier).eval().requires_grad_(False)
    return head, classifier


def named_optimizer(parameters: list[torch.nn.Parameter], config: PPOConfig) -> torch.optim.Optimizer:
    """The optimizer `optim` names, built as the Trainer builds it (LlamaFactory's PPO trainer does the same);
    weight decay on matrices only, not on biases and norm weights, as the Trainer's parameter groups."""
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(optim=config.optim, learning_rate=config.learning_rate,
                                  weight_decay=config.weight_decay, use_cpu=not torch.cuda.is_available(),
                                  report_to="none")
    optimizer_class, options = Trainer.get_optimizer_cls_and_kwargs(arguments)
    groups = [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]
    return optimizer_class([group for group in groups if group["params"]], **options)


def train_ppo(shared: SharedModel, prompts: list[list[int]], config: PPOConfig, generation: dict[str, Any],
              on_step=None, checkpoints: Path | None = None, resume: Path | None = None) -> list[dict[str, float]]:
    """The PPO loop over the prompts; returns each step's figures (on_step(entry) sees each new one as it comes).
    With `checkpoints` (a staging folder) the loop's state is saved there every save_steps; `resume` is a
    checkpoint to go on from (tasks.ppo_checkpoints)."""
    from transformers import get_scheduler

    model = shared.model
    rollout_batch = config.batch_size * config.gradient_accumulation_steps * config.ppo.buffer_size
    steps = total_steps(config, len(prompts), rollout_batch)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(shared.critic.parameters())
    optimizer = named_optimizer(parameters, config)
    warmup = config.schedule.warmup_steps or math.ceil((config.schedule.warmup_ratio or 0) * steps)
    loop = LoopState(optimizer=optimizer,
                     scheduler=get_scheduler(config.schedule.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                             num_training_steps=steps,
                                             scheduler_specific_kwargs=dict(config.schedule.lr_scheduler_kwargs or {})),
                     scaler=torch.amp.GradScaler(shared.device.type, enabled=config.precision == "fp16"),
                     kl_control=AdaptiveKLController(config.ppo.init_kl_coef, config.ppo.target_kl, config.ppo.horizon),
                     moments=RunningMoments(), rng=random.Random(config.seed))
    done = restore_checkpoint(resume, shared, loop) if resume else 0
    for step in range(done + 1, steps + 1):
        check_stop()
        if len(loop.order) < rollout_batch:  # a new pass over the prompts, shuffled
            more = list(range(len(prompts)))
            loop.rng.shuffle(more)
            loop.order += more
        chosen, loop.order = loop.order[:rollout_batch], loop.order[rollout_batch:]
        batch_prompts = [prompts[i] for i in chosen]
        model.eval()
        replies = sample_replies(shared, batch_prompts, config.rollout, generation, config.batch_size)
        batch = experience(shared, batch_prompts, replies, generation["pad_token_id"], loop.kl_control.value,
                           config.ppo, loop.moments)
        model.train()
        stats = optimize(shared, batch, config, optimizer, parameters, loop.rng, loop.scaler)
        loop.kl_control.update(float(batch["kl"]), rollout_batch)
        loop.scheduler.step()
        entry = {"step": step, "loss": stats["loss"], "reward": float(batch["scores"].mean()),
                 "kl": float(batch["kl"]), "kl_coef": loop.kl_control.value,
                 "learning_rate": loop.scheduler.get_last_lr()[0],
                 "reply_length": sum(map(len, replies)) / len(replies), **{k: stats[k] for k in stats if k != "loss"}}
        loop.history.append(entry)
        if on_step:
            on_step(entry)
        if checkpoints is not None and step % config.save_steps == 0 and step < steps:
            save_checkpoint(checkpoints, step, shared, loop, config.save_total_limit)
    return loop.history
