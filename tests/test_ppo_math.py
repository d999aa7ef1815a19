"""PPO math against hand computations, and a two-armed bandit learned with it."""

import math

import numpy as np
import pytest
import torch

from tasks.ppo_math import (
    AdaptiveKLController,
    RunningMoments,
    advantages_and_returns,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    ppo_losses,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second reply is two tokens long


def test_masked_statistics():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    seen = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert masked_mean(values, MASK).item() == pytest.approx(3.0)
    assert masked_mean(values, MASK, dim=1).tolist() == pytest.approx([2.0, 4.5])
    assert masked_var(values, MASK).item() == pytest.approx(np.var(seen, ddof=1))
    assert masked_var(values, MASK, unbiased=False).item() == pytest.approx(np.var(seen))
    whitened = masked_whiten(values, MASK)
    assert masked_mean(whitened, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(whitened, MASK).item() == pytest.approx(1.0, abs=1e-4)
    kept = masked_whiten(values, MASK, shift_mean=False)
    assert masked_mean(kept, MASK).item() == pytest.approx(3.0, abs=1e-5)


def test_the_score_lands_on_each_reply_s_last_token():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, -2.0]])
    rewards, kl = kl_penalized_rewards(logprobs, ref, torch.tensor([10.0, 20.0]), MASK, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, -0.5], [0.0, -1.0, 0.0]]
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.05 + 10.0, 0.0, 0.1 + 20.0, 0.0])


def test_gae_by_hand():
    values = torch.tensor([[0.5, 0.2, 0.1], [1.0, 0.5, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    gamma, lam = 1.0, 0.95
    # Row 1: delta2 = 1 - 0.1 = 0.9; delta1 = 0 + 0.1 - 0.2 = -0.1; delta0 = 0 + 0.2 - 0.5 = -0.3
    a2 = 0.9
    a1 = -0.1 + lam * a2
    a0 = -0.3 + lam * a1
    # Row 2 (masked after two tokens: value and reward at t=2 count as 0): delta1 = 2 - 0.5; delta0 = 0.5 - 1
    b2 = 0.0
    b1 = 1.5 + lam * b2
    b0 = -0.5 + lam * b1
    advantages, returns = advantages_and_returns(values, rewards, MASK, gamma, lam, whiten_rewards=False)
    assert returns.flatten().tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1, b0 + 1.0, b1 + 0.5, b2])
    raw = [a0, a1, a2, b0, b1]
    expected = (np.array(raw) - np.mean(raw)) / math.sqrt(np.var(raw, ddof=1) + 1e-8)
    assert [advantages[0, 0], advantages[0, 1], advantages[0, 2], advantages[1, 0], advantages[1, 1]] == \
        pytest.approx(expected.tolist(), abs=1e-5)
    assert not advantages.requires_grad


def test_whitened_rewards_keep_their_mean():
    values = torch.zeros(2, 3)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 3.0, 0.0]])
    _, plain = advantages_and_returns(values, rewards, MASK, 1.0, 1.0, whiten_rewards=False)
    _, whitened = advantages_and_returns(values, rewards, MASK, 1.0, 1.0, whiten_rewards=True)
    assert masked_mean(whitened, MASK).item() != pytest.approx(masked_mean(plain, MASK).item())
    seen = [0.0, 0.0, 1.0, 0.0, 3.0]
    scale = 1 / math.sqrt(np.var(seen, ddof=1) + 1e-8)
    mean = np.mean(seen)
    first_row_last = (1.0 - mean) * scale + mean  # whitened, then the mean put back
    assert whitened[0, 2].item() == pytest.approx(first_row_last, abs=1e-5)


def test_ppo_losses_unclipped_clipped_and_skipped():
    mask = torch.ones(1, 2)
    advantages, returns = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 0.0]])
    same = torch.tensor([[-1.0, -1.0]])
    values = torch.tensor([[0.1, -0.1]])
    out = ppo_losses(same, same, values, values, advantages, returns, mask)
    assert out["policy_loss"].item() == pytest.approx(0.0)  # -mean(adv) at ratio 1
    assert out["value_loss"].item() == pytest.approx(0.5 * 0.01)
    assert out["loss"].item() == pytest.approx(0.1 * 0.005) and out["clipfrac"].item() == 0.0
    # ratio e^0.5 = 1.65 on the first token (advantage 1: clipped to 1.2) and 1 on the second
    moved = torch.tensor([[-0.5, -1.0]])
    out = ppo_losses(moved, same, values, values, advantages, returns, mask)
    assert out["policy_loss"].item() == pytest.approx((-1.2 + 1.0) / 2)
    assert out["clipfrac"].item() == pytest.approx(0.5)
    # a value prediction far from the old one is clipped to old +- 0.2
    far = torch.tensor([[1.0, -0.1]])
    out = ppo_losses(same, same, far, values, advantages, returns, mask)
    assert out["value_loss"].item() == pytest.approx(0.5 * (max(1.0**2, 0.3**2) + 0.01) / 2)
    wild = ppo_losses(same + 5, same, values, values, advantages, returns, mask)  # mean ratio e^5 > 10
    assert wild["loss"].item() == 0.0 and wild["policy_loss"].item() == 0.0


def test_adaptive_kl_controller():
    control = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    control.update(12.0, 1000)  # error clipped to +0.2
    assert control.value == pytest.approx(0.2 * (1 + 0.2 * 0.1))
    control.update(3.0, 1000)  # error -0.5 clipped to -0.2
    assert control.value == pytest.approx(0.2 * 1.02 * (1 - 0.02))
    control.update(6.6, 1000)  # error +0.1, unclipped
    assert control.value == pytest.approx(0.2 * 1.02 * 0.98 * 1.01)


def test_running_moments_and_score_normalisation():
    moments = RunningMoments()
    first, second = [1.0, 2.0, 3.0], [10.0, 20.0]
    batch_mean, batch_std = moments.update(torch.tensor(first))
    assert batch_mean == pytest.approx(2.0) and batch_std == pytest.approx(np.std(first, ddof=1))
    scores = normalize_scores(torch.tensor(second), moments)
    every = first + second
    assert moments.mean == pytest.approx(np.mean(every)) and moments.std == pytest.approx(np.std(every, ddof=1))
    assert scores.tolist() == pytest.approx(((np.array(second) - np.mean(every)) / np.std(every, ddof=1)).tolist())


def test_a_two_armed_bandit_learns_the_rewarded_arm():
    torch.manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)
    value = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([logits, value], lr=0.1)
    control = AdaptiveKLController(0.0, target=6.0, horizon=10_000)
    mask = torch.ones(16, 1)
    for _ in range(40):
        with torch.no_grad():
            actions = torch.multinomial(logits.softmax(-1), 16, replacement=True)
            old = logits.log_softmax(-1)[actions].unsqueeze(1)
            old_values = value.expand(16, 1).clone()
        scores = (actions == 0).float()
        rewards, _ = kl_penalized_rewards(old, old, scores, mask, control.value)
        advantages, returns = advantages_and_returns(old_values, rewards, mask, 1.0, 0.95, False)
        for _ in range(4):
            new = logits.log_softmax(-1)[actions].unsqueeze(1)
            out = ppo_losses(new, old, value.expand(16, 1), old_values, advantages, returns, mask)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    assert logits.softmax(-1)[0].item() > 0.9


def test_whitening_one_reply_token_centres_it():
    """A rollout batch of one single-token reply (batch size 1, EOS first) stopped the stage with an internal error."""
    values, mask = torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([[0, 1, 0]])
    assert masked_whiten(values, mask)[0, 1].item() == 0.0
    assert masked_whiten(values, mask, shift_mean=False)[0, 1].item() == 3.0
    advantages, returns = advantages_and_returns(values, torch.tensor([[0.0, 1.0, 0.0]]), mask, 1.0, 0.95, True)
    assert torch.isfinite(advantages).all() and torch.isfinite(returns).all()
