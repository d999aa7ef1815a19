"""Preference losses as LlamaFactory computes them, as small pure functions on tensors.

Notation: pc, pr are the policy's log-probs of the chosen and rejected replies (sums over the reply's
tokens, or per-token averages where a loss is defined on those: ipo, orpo, simpo); rc, rr the
reference's; beta the preference beta; z = (pc - pr) - (rc - rr). Rewards are the implicit rewards
the losses report (beta times a log-ratio), detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def token_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the label tokens and their mask (labels shifted by one; -100 ignored)."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logps = torch.gather(logits[:, :-1].float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_logps(logps: Tensor, mask: Tensor, average: bool) -> Tensor:
    """Sum (or mean over label tokens) of per-token log-probs, per sequence."""
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def ld_logps(logps: Tensor, mask: Tensor, shared_lengths: Tensor, alpha: float) -> Tensor:
    """LD-DPO: label tokens within the first `shared_lengths` of each sequence count fully, later ones times alpha
    (so the longer reply of a pair is not favoured for its extra tokens alone)."""
    position = mask.long().cumsum(-1) - 1  # index among the sequence's label tokens
    shared = (position < shared_lengths.unsqueeze(-1)) & mask
    return (logps * shared).sum(-1) + alpha * (logps * (mask & ~shared)).sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float,
             kind: str, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family losses and implicit rewards: sigmoid (with cDPO label smoothing), hinge, ipo and kto_pair.

    sigmoid: -(1-e) logsigmoid(beta z) - e logsigmoid(-beta z); hinge: relu(1 - beta z);
    ipo: (z - 1/(2 beta))^2; kto_pair (TRL 0.8's): each pair's chosen log-ratio against the batch's rejected KL
    and its rejected log-ratio against the chosen KL, giving 2B losses."""
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    z = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * z)
    elif kind == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    elif kind == "kto_pair":
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))))
    else:
        raise ValueError(f"unknown DPO loss '{kind}' (sigmoid, hinge, ipo or kto_pair)")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def orpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO: the chosen reply's NLL plus beta times -logsigmoid of the log odds ratio (averaged log-probs)."""
    log_odds = (policy_chosen_avg - policy_rejected_avg) - (
        torch.log1p(-torch.exp(policy_chosen_avg)) - torch.log1p(-torch.exp(policy_rejected_avg)))
    losses = -policy_chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, (beta * policy_chosen_avg).detach(), (beta * policy_rejected_avg).detach()


def simpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, beta: float,
               gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: -logsigmoid(beta (pc - pr) - gamma) on averaged log-probs, no reference."""
    losses = -F.logsigmoid(beta * (policy_chosen_avg - policy_rejected_avg) - gamma)
    return losses, (beta * policy_chosen_avg).detach(), (beta * policy_rejected_avg).detach()


def kto_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             policy_kl: Tensor, ref_kl: Tensor, beta: float, desirable_weight: float,
             undesirable_weight: float, across_ranks=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO as TRL computes it: desirable rows lose 1 - sigmoid(beta (ratio - KL)), undesirable ones
    1 - sigmoid(beta (KL - ratio)), where KL is estimated from mismatched prompt/reply pairs and clamped at 0.
    `across_ranks` averages the ranks' estimates (TRL gathers them), so several ranks share one KL."""
    kl = (policy_kl - ref_kl).mean().detach()
    kl = (across_ranks(kl) if across_ranks else kl).clamp(min=0)
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (chosen_ratio - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected_ratio)))))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach(), kl


def pairwise_wins(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """1 for each pair whose chosen score is strictly higher, else 0 (a tie is not a win, as in LlamaFactory's rm
    accuracy); their mean is the pairwise accuracy."""
    return (chosen_scores > rejected_scores).float()