"""Run a (possibly pipelined) GPTModel over micro-batches through megatron's schedule.

The same call works at PP=1 (no pipelining) and PP>1 (1F1B): megatron picks the schedule, and
on the last stage `per_microbatch` turns each micro-batch's TP-sharded logits into whatever the
caller needs (a loss, token NLLs, gathered logits). Other stages return an empty list.
A micro-batch is a dict with "tokens" ([b, s] input ids), optionally "attention_mask" ([b, 1, s, s],
True where attention is blocked; default causal), and whatever else `per_microbatch` reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from nemo_minitron.models.gpt import causal_attention_mask, position_ids_for, unwrap_model


def vocab_parallel_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood from [b, s, v/tp] logits sharded over TP ranks."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # megatron's kernel expects sequence-first [s, b, v/tp] and fp32 for an exact softmax.
    return vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(), labels.t().contiguous()).t()


def gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    """[b, s, v/tp] shards -> full [b, s, v] logits on every TP rank (tests, generation)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    shards = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


@contextmanager
def without_output_layer(model) -> Iterator[None]:
    """Forward passes that stop after the decoder (its final norm included): the last pipeline stage returns the
    hidden states [s, b, h] instead of logits. This is megatron's own switch for a stage that holds no output layer
    (`post_process`), turned off for the duration. For passes that only read activations, as the importance and
    reconstruction hooks do: the output layer and the loss are a quarter of SmolLM2-135M's calibration forward (a
    49k vocabulary on a 576-wide model), ~1/15 of Llama-3.1-8B's."""
    inner = unwrap_model(model)
    post_process = inner.post_process
    inner.post_process = False
    try:
        yield
    finally:
        inner.post_process = post_process


def forward_microbatches(
    model,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    per_microbatch: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any],
    forward_only: bool = True,
) -> list[Any]:
    """Run `micro_batches` (all with equal token shapes) through the schedule.

    `per_microbatch(logits, micro_batch)` runs on the last stage with [b, s, v/tp] logits. With
    `forward_only=False` it must return a scalar loss: megatron back-propagates it divided by the
    number of micro-batches (gradients of the mean loss accumulate in `.grad`), and the detached
    losses are returned.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0]["tokens"].shape
    results: list[Any] = []
    device = next(model.parameters()).device
    mask = causal_attention_mask(s, device)

    def forward_step(data_iterator, step_model):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        tokens = batch["tokens"]
        # Packed samples bring their own block-diagonal mask (one causal block per document).
        output = step_model(tokens, position_ids_for(tokens), batch.get("attention_mask", mask))

        def collect(logits):
            value = per_microbatch(logits, batch)
            if forward_only:
                results.append(value)
                # The schedule wants (loss, reduced dict); the caller reads `results` instead.
                return torch.zeros((), device=device), {}
            # A copy: the schedule divides the returned loss in place by the number of micro-batches.
            results.append(value.detach().clone())
            return value, {}

        return output, collect

    schedule = get_forward_backward_func()
    run = lambda: schedule(  # noqa: E731
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
    if not forward_only:
        run()
        return results
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        model.train(was_training)
    return results


def broadcast_from_last_stage(values: list[Any]) -> list[Any]:
    """`forward_microbatches` results exist on the last pipeline stage; give every rank a copy."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return values
    box = [values if ps.is_pipeline_last_stage() else None]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]
