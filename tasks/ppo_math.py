"""PPO's math, ported from TRL 0.9.6's PPOTrainer (the version LlamaFactory's PPO used; TRL 1.x has none).

Tensors are [B, T] over reply positions: T is the padded reply length, `mask` is 1 on a row's real reply
tokens. Each function is pure, so tests check it against a hand computation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values where mask is set (over one dimension, or all)."""
    mask = mask.to(values.dtype)
    if dim is not None:
        return (values * mask).sum(dim) / mask.sum(dim)
    return (values * mask).sum() / mask.sum()


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of values where mask is set, with Bessel's correction unless unbiased is False."""
    variance = masked_mean((values - masked_mean(values, mask)) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count <= 1:
            raise ValueError("masked_var needs at least two unmasked values")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Values scaled to unit variance over the mask, and centred unless shift_mean is False. One value has no
    variance (a rollout batch of one single-token reply): it is only centred."""
    mean = masked_mean(values, mask)
    if mask.sum() < 2:
        return values - mean if shift_mean else values
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalized_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor,
                         kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token rewards -kl_coef (logprob - ref_logprob), plus each sequence's score at its last reply token."""
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    last = mask.shape[1] - 1 - mask.flip(-1).float().argmax(-1)  # the last position where the row's mask is set
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def advantages_and_returns(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float,
                           whiten_rewards: bool) -> tuple[Tensor, Tensor]:
    """GAE advantages (whitened over the mask) and returns (the advantages before whitening plus the values)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    length = rewards.shape[-1]
    last_gae = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    return masked_whiten(advantages, mask).detach(), returns


def ppo_losses(logprobs: Tensor, old_logprobs: Tensor, values: Tensor, old_values: Tensor, advantages: Tensor,
               returns: Tensor, mask: Tensor, cliprange: float = 0.2, cliprange_value: float = 0.2,
               vf_coef: float = 0.1, ratio_threshold: float = 10.0) -> dict[str, Tensor]:
    """The clipped policy loss and clipped value loss; a batch whose mean ratio exceeds ratio_threshold is skipped
    (all losses times 0), as TRL does."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    loss = policy_loss + vf_coef * value_loss
    mean_ratio = masked_mean(ratio, mask)
    if mean_ratio.item() > ratio_threshold:
        policy_loss, value_loss, loss = policy_loss * 0.0, value_loss * 0.0, loss * 0.0
    return {
        "loss": loss,
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "approx_kl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask).detach(),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "ratio": mean_ratio.detach(),
    }


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al.): moves kl_coef so the observed KL tracks the target."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of scores across steps (Chan et al.'s parallel update, as TRL's)."""

    def __init__(self) -> None:
        self.mean, self.var, self.std, self.count = 0.0, 1.0, 1.0, 1e-24

    def update(self, values: Tensor) -> tuple[float, float]:
        """Fold a batch into the running figures; returns the batch's mean and (unbiased) std."""
        count = values.numel()
        var, mean = torch.var_mean(values.float(), unbiased=False)
        mean, var = mean.item(), var.item()
        delta = mean - self.mean
        total = self.count + count
        summed = self.var * self.count + delta**2 * self.count * count / total + var * count
        self.mean += delta * count / total
        self.var = summed / total
        self.std = (self.var * total / (total - 1)) ** 0.5
        self.count = total
        return mean, (var * count / max(count - 1, 1)) ** 0.5


def normalize_scores(scores: Tensor, moments: RunningMoments, eps: float = 1e-8) -> Tensor:
    """Scores scaled by the running statistics after folding this batch in: (s - mean) / (std + eps)."""
    moments.update(scores)
    return (scores - moments.mean) / (moments.std + eps)
