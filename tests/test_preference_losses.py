"""Preference losses against hand computations on small fixed numbers."""

import math

import pytest
import torch

from tasks.preference_losses import (
    dpo_loss,
    kto_loss,
    ld_logps,
    orpo_loss,
    pairwise_wins,
    sequence_logps,
    simpo_loss,
    token_logps,
)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_token_logps_shift_labels_and_ignore_masked_positions():
    # Vocabulary of 3; logits log(2), 0, 0 give probabilities 1/2, 1/4, 1/4 at every position.
    logits = torch.log(t(2, 1, 1)).expand(1, 4, 3).clone()
    labels = torch.tensor([[-100, 0, -100, 2]])  # position 0 is never a target; 2 is ignored
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, False, True]]
    assert logps[0].tolist() == pytest.approx([math.log(0.5), 0.0, math.log(0.25)])
    assert sequence_logps(logps, mask, average=False).item() == pytest.approx(math.log(0.5) + math.log(0.25))
    assert sequence_logps(logps, mask, average=True).item() == pytest.approx((math.log(0.5) + math.log(0.25)) / 2)


def test_ld_logps_weights_tokens_past_the_shared_length():
    logps = t(-1, -2, -3, -4).unsqueeze(0)
    mask = torch.tensor([[False, True, True, True]])  # label tokens are -2, -3, -4
    shared = torch.tensor([2])
    assert ld_logps(logps, mask, shared, 0.0).item() == pytest.approx(-5)
    assert ld_logps(logps, mask, shared, 0.5).item() == pytest.approx(-5 - 0.5 * 4)
    assert ld_logps(logps, mask, torch.tensor([5]), 0.5).item() == pytest.approx(-9)


PC, PR, RC, RR, BETA = -2.0, -3.0, -2.5, -2.8, 0.5
Z = (PC - PR) - (RC - RR)  # 1.3


@pytest.mark.parametrize(("kind", "smoothing", "expected"), [
    ("sigmoid", 0.0, -logsigmoid(BETA * Z)),
    ("sigmoid", 0.2, -0.8 * logsigmoid(BETA * Z) - 0.2 * logsigmoid(-BETA * Z)),
    ("hinge", 0.0, max(0.0, 1 - BETA * Z)),
    ("ipo", 0.0, (Z - 1 / (2 * BETA)) ** 2),
])
def test_dpo_losses(kind, smoothing, expected):
    losses, chosen, rejected = dpo_loss(t(PC), t(PR), t(RC), t(RR), BETA, kind, smoothing)
    assert losses.item() == pytest.approx(expected, rel=1e-5)
    assert chosen.item() == pytest.approx(BETA * (PC - RC)) and rejected.item() == pytest.approx(BETA * (PR - RR))
    assert not chosen.requires_grad


def test_kto_pair_gives_two_losses_per_pair():
    pc, pr, rc, rr = t(-2.0, -1.0), t(-3.0, -4.0), t(-2.5, -1.5), t(-2.8, -3.0)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, BETA, "kto_pair")
    chosen_ratio, rejected_ratio = [0.5, 0.5], [-0.2, -1.0]
    chosen_kl, rejected_kl = max(0.0, 0.5), max(0.0, -0.6)
    expected = [1 - sigmoid(BETA * (c - rejected_kl)) for c in chosen_ratio]
    expected += [1 - sigmoid(BETA * (chosen_kl - r)) for r in rejected_ratio]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="unknown DPO loss 'dpop'"):
        dpo_loss(t(PC), t(PR), t(RC), t(RR), BETA, "dpop")


def test_orpo_and_simpo():
    pc, pr = -0.5, -1.5  # averaged log-probs
    log_odds = (pc - pr) - (math.log1p(-math.exp(pc)) - math.log1p(-math.exp(pr)))
    losses, chosen, rejected = orpo_loss(t(pc), t(pr), BETA)
    assert losses.item() == pytest.approx(-pc - BETA * logsigmoid(log_odds), rel=1e-5)
    assert chosen.item() == pytest.approx(BETA * pc) and rejected.item() == pytest.approx(BETA * pr)
    losses, _, _ = simpo_loss(t(pc), t(pr), 2.0, 0.5)
    assert losses.item() == pytest.approx(-logsigmoid(2.0 * (pc - pr) - 0.5), rel=1e-5)


def test_kto_loss_with_weights_and_the_kl_clamp():
    pc, rc = t(-2.0), t(-2.6)  # one desirable row: log-ratio 0.6
    pr, rr = t(-3.0, -1.0), t(-2.0, -1.5)  # two undesirable rows: log-ratios -1.0, 0.5
    losses, chosen, rejected, kl = kto_loss(pc, pr, rc, rr, t(-4.0, -5.0), t(-4.5, -5.1), BETA, 1.0, 2.0)
    assert kl.item() == pytest.approx(0.3)  # mean(0.5, 0.1)
    expected = [1 - sigmoid(BETA * (0.6 - 0.3))] + [2 * (1 - sigmoid(BETA * (0.3 - r))) for r in (-1.0, 0.5)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert chosen.tolist() == pytest.approx([0.3]) and rejected.tolist() == pytest.approx([-0.5, 0.25])
    _, _, _, negative = kto_loss(pc, pr, rc, rr, t(-5.0), t(-4.0), BETA, 1.0, 1.0)
    assert negative.item() == 0.0  # a negative KL estimate counts as none
    only_desirable, _, _, _ = kto_loss(pc, t(), rc, t(), t(-4.0), t(-4.0), BETA, 1.0, 1.0)
    assert only_desirable.shape == (1,)


def test_a_pairwise_tie_is_not_a_win():
    assert pairwise_wins(t(1.0, 2.0, 3.0, 0.5), t(0.0, 2.0, 1.0, 1.0)).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_a_dpo_gradient_step_widens_the_chosen_margin():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, t(-2.0), t(-2.0), BETA, "sigmoid")
    losses.mean().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending raises pc and lowers pr
