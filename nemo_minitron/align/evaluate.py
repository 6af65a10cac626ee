"""Held-out measures of alignment: response-only loss (SFT, SteerLM) and preference accuracy (DPO/RPO)."""

from __future__ import annotations

import torch

from nemo_minitron.align.losses import sequence_logprobs
from nemo_minitron.models.runner import broadcast_from_last_stage, forward_microbatches
from nemo_minitron.train.data import collate


def response_logprobs(model, dataset, micro_batch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] summed log-prob of each sample's trained tokens, [n] their count), on every rank."""
    batches = [collate([dataset[j] for j in range(i, min(i + micro_batch_size, len(dataset)))])
               for i in range(0, len(dataset), micro_batch_size)]
    sums: list[float] = []
    for batch in batches:  # one call per batch: the last one may be smaller
        out = forward_microbatches(
            model, [batch], lambda logits, mb: sequence_logprobs(logits, mb["labels"], mb["loss_mask"]).tolist()
        )
        sums += broadcast_from_last_stage(out)[0]
    counts = torch.stack([dataset[i]["loss_mask"].sum() for i in range(len(dataset))])
    return torch.tensor(sums, dtype=torch.float64), counts.double()


def response_loss(model, dataset, micro_batch_size: int = 4) -> float:
    """Mean NLL per response token (what SFT minimises), over the whole dataset."""
    logprobs, counts = response_logprobs(model, dataset, micro_batch_size)
    return float(-logprobs.sum() / counts.sum())


def preference_accuracy(model, pairs_dataset, micro_batch_size: int = 4) -> float:
    """Fraction of pairs whose chosen response the model finds more likely than the rejected one."""
    logprobs, _ = response_logprobs(model, pairs_dataset, micro_batch_size)
    pairs = logprobs.view(-1, 2)
    return float((pairs[:, 0] > pairs[:, 1]).double().mean())
