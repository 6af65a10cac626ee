"""Depth scores: what the model loses without a layer, or without a contiguous block of layers.

Layers are dropped virtually with `skip_layers`, which makes the chosen `TransformerLayer`s pass
their input through; the model computes exactly what the physically pruned model computes (tested).
Works at any PP: each stage skips the layers it holds (global indices), and the loss is the
all-reduced held-out loss of `eval.perplexity`. Every function here is collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.eval.perplexity import evaluate_perplexity
from nemo_minitron.models.gpt import arch_of, unwrap_model

log = logging.getLogger("nemo_minitron")

Metric = Callable[[object], float]  # model -> value, lower is better; collective


def _passthrough(*args, hidden_states=None, context=None, **kwargs):
    # TransformerBlock calls layer(hidden_states=..., context=..., ...) and unpacks (hidden, context).
    return (args[0] if hidden_states is None else hidden_states), context


def _mamba_passthrough(*args, hidden_states=None, **kwargs):
    # A hybrid's Mamba stack unpacks (hidden, context) from its attention and MLP layers but takes a
    # Mamba layer's output as it is.
    return args[0] if hidden_states is None else hidden_states


@contextmanager
def skip_layers(model, layers: Iterable[int]) -> Iterator[None]:
    """Within the block, the layers with these global 0-based indices return their input."""
    skipped = set(layers)
    touched = []
    try:
        for layer in unwrap_model(model).decoder.layers:
            if layer.layer_number - 1 in skipped:  # an instance attribute shadows the method
                layer.forward = _mamba_passthrough if hasattr(layer, "mixer") else _passthrough
                touched.append(layer)
        yield
    finally:
        for layer in touched:
            del layer.forward


def loss_metric(windows: torch.Tensor, micro_batch_size: int = 4) -> Metric:
    """Mean LM loss (token NLL) over `windows`: the default depth metric."""
    return lambda model: evaluate_perplexity(model, windows, micro_batch_size, progress=False).nll


def layer_loss_scores(model, metric: Metric) -> tuple[torch.Tensor, float]:
    """(metric increase when each layer alone is dropped [L], metric of the full model)."""
    base = metric(model)
    increases = []
    for i in range(arch_of(model).num_layers):
        with skip_layers(model, [i]):
            increases.append(metric(model) - base)
        log.info("depth: without layer %d the loss rises by %.4f", i, increases[-1])
    return torch.tensor(increases), base


def contiguous_block_scores(model, num_drop: int, metric: Metric) -> torch.Tensor:
    """Metric of the model without layers [i, i + num_drop) for every start i ([L - num_drop + 1])."""
    L = arch_of(model).num_layers
    if not 0 < num_drop < L:
        raise UserError(f"cannot drop {num_drop} contiguous layers of {L}")
    values = []
    for start in range(L - num_drop + 1):
        with skip_layers(model, range(start, start + num_drop)):
            values.append(metric(model))
        log.info("depth: without layers %d-%d the loss is %.4f", start, start + num_drop - 1, values[-1])
    return torch.tensor(values)
