"""The loss interface of the training loop, and the language-model loss.

A loss is any callable `loss(output, batch) -> (loss, metrics)`: `output` is what the trained
module returns on the last pipeline stage for one micro-batch (TP-sharded logits [b, s, v/tp] for a
`GPTModel`, a `DistillationOutput` for a `DistillationModel`), `batch` the micro-batch dict. It
returns the scalar to back-propagate and detached scalar metrics to log (averaged over
micro-batches and data-parallel replicas by the loop).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nemo_minitron.models.runner import vocab_parallel_token_nll

LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]


class TrainingLoss(Protocol):
    def __call__(self, output: Any, batch: dict[str, torch.Tensor]) -> LossResult: ...


def masked_mean(values: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token `values` [b, s] over the tokens where `loss_mask` is set (all if None)."""
    if loss_mask is None:
        return values.mean()
    mask = loss_mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


class LMLoss:
    """Next-token cross-entropy on vocab-parallel logits (megatron's kernel, exact under TP)."""

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> LossResult:
        loss = masked_mean(vocab_parallel_token_nll(logits, batch["labels"]), batch.get("loss_mask"))
        return loss, {"lm_loss": loss.detach()}
