"""Calibration: forward passes with the importance hooks on, at any TP x PP x DP.

`estimate_importance(model, forward_loop)` registers the hooks, calls `forward_loop(model)` (any
code that runs forward passes: the caller's own data loop, `activation_loop(windows)` or
`perplexity_loop(windows)`) and reduces the statistics over all ranks. Both ready loops run
the held-out perplexity's windows through megatron's schedule at any PP
(`eval.perplexity.forward_windows`), split over data-parallel replicas, with a progress bar in
tokens/s. `activation_loop` stops after the decoder: the hooks read the layers' activations, not
the logits, so it skips the output layer and the loss (what the prune stage runs).
`perplexity_loop` also reports the calibration loss of the unpruned model, at their cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from nemo_minitron.errors import UserError
from nemo_minitron.eval.perplexity import evaluate_perplexity, forward_windows
from nemo_minitron.importance.aggregation import Aggregation
from nemo_minitron.importance.hooks import ImportanceRecorder
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.runner import without_output_layer

log = logging.getLogger("nemo_minitron")


def sample_windows(stream: np.ndarray, seq_len: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """[n, seq_len + 1] non-overlapping windows drawn uniformly from the whole token stream.

    Corpus files are grouped by source, so the first windows would all come from one source; a
    seeded choice (kept in stream order) covers all of them. Fewer windows than asked are
    returned, with a warning, when the stream is too short.
    """
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} must be at least 2")
    available = (len(stream) - 1) // seq_len
    if available < 1:
        raise UserError(f"the calibration text has {len(stream)} tokens, fewer than seq_len={seq_len} + 1")
    if num_samples > available:
        log.warning("the calibration text holds only %d windows of %d tokens (asked for %d)",
                    available, seq_len, num_samples)
    chosen = np.sort(np.random.default_rng(seed).choice(available, size=min(num_samples, available), replace=False))
    index = chosen[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(stream)[index].astype(np.int64))


ForwardLoop = Callable[[object], "dict | None"]  # forward_loop(model) -> optional info for the scores


def perplexity_loop(windows: torch.Tensor, micro_batch_size: int = 4, progress: bool = True,
                    purpose: str = "importance") -> ForwardLoop:
    """A forward loop over token windows ([n, s + 1]) that reports tokens, speed and LM loss
    (its log lines start with `purpose`)."""

    def forward_loop(model) -> dict:
        log.info("%s: calibration forward over %d windows of %d tokens", purpose, len(windows), windows.shape[1] - 1)
        result = evaluate_perplexity(model, windows, micro_batch_size, progress=progress)
        log.info("%s: %d tokens in %.1f s (%.0f tokens/s), calibration loss %.4f",
                 purpose, result.tokens, result.seconds, result.tokens_per_s, result.nll)
        return {"windows": len(windows), "seq_len": windows.shape[1] - 1, "tokens": result.tokens,
                "tokens_per_s": round(result.tokens_per_s, 1), "calibration_loss": result.nll}

    return forward_loop


def activation_loop(windows: torch.Tensor, micro_batch_size: int = 4, progress: bool = True,
                    purpose: str = "importance") -> ForwardLoop:
    """A forward loop over token windows ([n, s + 1]) that runs the decoder alone (`without_output_layer`)
    and reports tokens and speed (its log lines start with `purpose`)."""

    def forward_loop(model) -> dict:
        log.info("%s: calibration forward over %d windows of %d tokens", purpose, len(windows), windows.shape[1] - 1)
        with without_output_layer(model):
            _, seconds = forward_windows(model, windows, micro_batch_size, lambda hidden, mb: None, progress,
                                         desc=purpose)
        tokens = windows[:, 1:].numel()
        log.info("%s: %d tokens in %.1f s (%.0f tokens/s)", purpose, tokens, seconds, tokens / seconds)
        return {"windows": len(windows), "seq_len": windows.shape[1] - 1, "tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1)}

    return forward_loop


def estimate_importance(model, forward_loop: ForwardLoop, aggregation: Aggregation | None = None) -> ImportanceScores:
    """Activation importance of every axis (hidden channels, heads, neurons, Block Importance of
    layers) from the forward passes that `forward_loop(model)` runs (collective: every rank runs
    its part of the same loop). What the loop returns (a dict) is kept in `scores.info`."""
    start = time.perf_counter()
    with ImportanceRecorder(model, aggregation) as recorder:
        info = forward_loop(model) or {}
    return recorder.scores({**info, "seconds": round(time.perf_counter() - start, 3)})
