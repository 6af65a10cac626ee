"""Preference losses: values and gradients equal a direct full-vocabulary computation, at TP=1 and TP=2."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distributed import run_distributed

B, S, V = 4, 6, 40  # two pairs
gen = torch.Generator().manual_seed(0)
POLICY = torch.randn(B, S, V, generator=gen) * 2
REFERENCE = torch.randn(B, S, V, generator=gen) * 2
LABELS = torch.randint(0, V, (B, S), generator=gen)
MASK = (torch.rand(B, S, generator=gen) > 0.3).float()
REWARD = torch.tensor([4.0, 1.0, 3.0, 0.0])
KINDS = ["dpo", "ipo", "rpo", "rpo_sq"]


def reference_loss(kind: str, policy_logits: torch.Tensor, beta=0.3, eta=0.5, sft_weight=0.2) -> torch.Tensor:
    """Written from the formulas with probabilities, independently of the implementation."""
    def seq_logp(logits):
        probs = torch.softmax(logits.double(), dim=-1)
        return (torch.log(probs.gather(-1, LABELS.unsqueeze(-1)).squeeze(-1)) * MASK).sum(-1)

    pol, ref = seq_logp(policy_logits), seq_logp(REFERENCE)
    h = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    gap = REWARD[0::2].double() - REWARD[1::2].double()
    if kind == "dpo":
        per_pair = -torch.log(torch.sigmoid(beta * h))
    elif kind == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    elif kind == "rpo_sq":
        per_pair = (beta * h - eta * gap) ** 2
    else:
        target, model = torch.sigmoid(eta * gap), torch.sigmoid(beta * h)
        per_pair = target * torch.log(target / model) + (1 - target) * torch.log((1 - target) / (1 - model))
    sft = -pol[0::2].sum() / MASK[0::2].sum()
    return per_pair.mean() + sft_weight * sft


def ours(kind: str):
    """Loss and gradient of this TP rank's vocabulary shard of the policy logits."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.align.losses import PreferenceLoss

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    policy = POLICY.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    output = SimpleNamespace(student_logits=policy, teacher_logits=REFERENCE.chunk(tp, dim=-1)[rank])
    batch = {"labels": LABELS, "loss_mask": MASK, "reward": REWARD}
    loss, metrics = PreferenceLoss(kind, beta=0.3, eta=0.5, sft_weight=0.2)(output, batch)
    loss.backward()
    return loss.detach(), policy.grad, metrics


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_losses_and_grads_equal_reference(tp):
    for kind in KINDS:
        policy = POLICY.double().clone().requires_grad_(True)
        expected = reference_loss(kind, policy)
        expected.backward()
        results = run_distributed(ours, world_size=tp, tp=tp, args=(kind,))
        grads = torch.cat([grad for _, grad, _ in results], dim=-1)
        for loss, _, metrics in results:
            torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6, msg=kind)
            assert 0.0 <= metrics["preference_accuracy"] <= 1.0
        torch.testing.assert_close(grads.double(), policy.grad, rtol=1e-4, atol=1e-7, msg=kind)


def test_bad_settings_are_clear_errors():
    from nemo_minitron.align.losses import PreferenceLoss

    with pytest.raises(ValueError, match="loss.kind='ppo' is not one of"):
        PreferenceLoss("ppo")
    with pytest.raises(ValueError, match="loss.beta"):
        PreferenceLoss("dpo", beta=0)
