"""Calibration: forward passes with the importance hooks on, at any TP x PP x DP.

The forward passes are the held-out perplexity loop (`eval.perplexity.evaluate_perplexity`), which
already runs megatron's schedule at any PP, splits windows over data-parallel replicas and shows a
progress bar with tokens/s; with the hooks registered it fires them on every stage, and its loss
is the calibration loss of the unpruned model.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from nemo_minitron.eval.perplexity import evaluate_perplexity
from nemo_minitron.importance.aggregation import Aggregation
from nemo_minitron.importance.hooks import ImportanceRecorder
from nemo_minitron.importance.scores import ImportanceScores

log = logging.getLogger("nemo_minitron")


def sample_windows(stream: np.ndarray, seq_len: int, num_samples: int, seed: int = 0) -> torch.Tensor:
    """[n, seq_len + 1] non-overlapping windows drawn uniformly from the whole token stream.

    Corpus files are grouped by source, so the first windows would all come from one source; a
    seeded choice (kept in stream order) covers all of them. Fewer windows than asked are
    returned, with a warning, when the stream is too short.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2")
    available = (len(stream) - 1) // seq_len
    if available < 1:
        raise ValueError(f"the calibration text has {len(stream)} tokens, fewer than seq_len={seq_len} + 1")
    if num_samples > available:
        log.warning("the calibration text holds only %d windows of %d tokens (asked for %d)",
                    available, seq_len, num_samples)
    chosen = np.sort(np.random.default_rng(seed).choice(available, size=min(num_samples, available), replace=False))
    index = chosen[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(stream)[index].astype(np.int64))


def estimate_importance(
    model,
    windows: torch.Tensor,
    aggregation: Aggregation | None = None,
    micro_batch_size: int = 4,
    progress: bool = True,
) -> ImportanceScores:
    """Activation importance of every axis from forward passes over `windows` ([n, s + 1])."""
    log.info("importance: calibration forward over %d windows of %d tokens", len(windows), windows.shape[1] - 1)
    start = time.perf_counter()
    with ImportanceRecorder(model, aggregation) as recorder:
        result = evaluate_perplexity(model, windows, micro_batch_size, progress=progress)
    seconds = time.perf_counter() - start
    info = {
        "windows": len(windows),
        "seq_len": windows.shape[1] - 1,
        "tokens": result.tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(result.tokens / seconds, 1),
        "calibration_loss": result.nll,
    }
    scores = recorder.scores(info)
    log.info("importance: %d tokens in %.1f s (%.0f tokens/s), calibration loss %.4f",
             result.tokens, seconds, result.tokens / seconds, result.nll)
    return scores
