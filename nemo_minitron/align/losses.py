"""Preference losses (DPO, IPO, RPO) on vocab-parallel logits of a policy and a frozen reference.

The policy and reference run together as a `DistillationModel` (student = policy, teacher =
reference), so both share the ranks and the pipeline. A micro-batch holds whole pairs as
consecutive rows (chosen, rejected). With the sequence log-ratio
    h = [log pi(y_c) - log ref(y_c)] - [log pi(y_r) - log ref(y_r)]   (sums over response tokens)
the losses are
    dpo:     -log sigmoid(beta h)
    ipo:     (h - 1 / (2 beta))^2
    rpo:     KL( Bernoulli(sigmoid(eta (r_c - r_r))) || Bernoulli(sigmoid(beta h)) )  (Nemotron-4's
             reward-aware preference optimisation with the Bernoulli-KL distance)
    rpo_sq:  (beta h - eta (r_c - r_r))^2
Token log-probabilities come from megatron's vocab-parallel cross entropy, whose backward is exact
under TP, so no logits are gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_minitron.errors import UserError
from nemo_minitron.models.runner import vocab_parallel_token_nll
from nemo_minitron.train.loss import LossResult

KINDS = ("dpo", "ipo", "rpo", "rpo_sq")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[b] sum of log-probabilities of the masked label tokens."""
    return (-vocab_parallel_token_nll(logits, labels) * loss_mask).sum(-1)


def preference_objective(kind: str, margin: torch.Tensor, beta: float, eta: float,
                         reward_gap: torch.Tensor | None) -> torch.Tensor:
    """[pairs] loss from the log-ratio margin h (and the true reward gap for RPO)."""
    if kind == "dpo":
        return -F.logsigmoid(beta * margin)
    if kind == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    if reward_gap is None or torch.isnan(reward_gap).any():
        raise UserError(f"loss.kind={kind} needs chosen_reward and rejected_reward in every record")
    target = eta * reward_gap
    if kind == "rpo_sq":
        return (beta * margin - target) ** 2
    # KL(Bern(p*) || Bern(p)) with p* = sigmoid(target), p = sigmoid(beta h), in log space.
    p_star = torch.sigmoid(target)
    logp, log1mp = F.logsigmoid(beta * margin), F.logsigmoid(-beta * margin)
    logq, log1mq = F.logsigmoid(target), F.logsigmoid(-target)
    return p_star * (logq - logp) + (1 - p_star) * (log1mq - log1mp)


@dataclass
class PreferenceLoss:
    """A `TrainingLoss` over a `DistillationOutput` (policy = student, reference = teacher)."""

    kind: str = "dpo"
    beta: float = 0.1
    eta: float = 1.0          # RPO: scale of the true reward gap
    sft_weight: float = 0.0   # optional NLL of the chosen responses (per token), added to the loss

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"loss.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if self.beta <= 0:
            raise UserError(f"loss.beta={self.beta} must be positive")

    def __call__(self, output, batch: dict[str, torch.Tensor]) -> LossResult:
        labels, mask = batch["labels"], batch["loss_mask"]
        if labels.shape[0] % 2:
            raise UserError("preference micro-batches must hold whole (chosen, rejected) pairs: use an even micro batch")
        policy = sequence_logprobs(output.student_logits, labels, mask).view(-1, 2)
        reference = sequence_logprobs(output.teacher_logits.detach(), labels, mask).view(-1, 2)
        ratio = policy - reference
        margin = ratio[:, 0] - ratio[:, 1]
        reward = batch.get("reward")
        reward_gap = None if reward is None else (reward.view(-1, 2)[:, 0] - reward.view(-1, 2)[:, 1]).float()
        loss = preference_objective(self.kind, margin, self.beta, self.eta, reward_gap).mean()
        metrics = {
            "preference_loss": loss.detach(),
            "reward_margin": (self.beta * margin).mean().detach(),
            "chosen_reward": (self.beta * ratio[:, 0]).mean().detach(),
            "rejected_reward": (self.beta * ratio[:, 1]).mean().detach(),
            "preference_accuracy": (margin > 0).float().mean().detach(),
        }
        if self.sft_weight:
            chosen_tokens = mask.view(-1, 2, mask.shape[-1])[:, 0].sum().clamp(min=1)
            sft = -policy[:, 0].sum() / chosen_tokens
            loss = loss + self.sft_weight * sft
            metrics["sft_loss"] = sft.detach()
        return loss, metrics
