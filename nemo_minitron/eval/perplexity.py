"""Held-out perplexity of a Megatron model at any TP x PP x DP.

Protocol (docs/design.md section 12): documents are joined with EOS and tokenized once; the stream is
cut into non-overlapping windows of `seq_len` predicted tokens (each window's inputs start at the
previous window's last label, so every token after the first is predicted exactly once); the
incomplete tail is dropped. A token cap keeps windows spread evenly over the whole stream, not its
head: a file written source by source or in time order is sampled across all of it.
Perplexity = exp(mean token NLL) over all predicted tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_minitron import parallel
from nemo_minitron.errors import UserError
from nemo_minitron.models.runner import forward_microbatches, vocab_parallel_token_nll


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def spread_windows(available: int, wanted: int) -> np.ndarray:
    """Indices of `wanted` of `available` consecutive windows, evenly spaced: floor(i N / n) for
    i < n, so window 0 is always in and all N are taken when n >= N."""
    n = min(available, wanted)
    return np.arange(n) * available // n


def windows_from_stream(stream: np.ndarray, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, seq_len + 1] windows: inputs are [:, :-1], labels [:, 1:].

    The stream holds N = floor((len - 1) / seq_len) windows; `max_tokens` keeps
    n = max(1, max_tokens // seq_len) of them spread evenly over it (`spread_windows`)."""
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} must be at least 2")
    available = (len(stream) - 1) // seq_len
    if available < 1:
        raise UserError(f"the evaluation text has {len(stream)} tokens, fewer than seq_len={seq_len} + 1")
    chosen = spread_windows(available, available if max_tokens is None else max(1, max_tokens // seq_len))
    index = chosen[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(np.asarray(stream)[index].astype(np.int64))


def forward_windows(model, windows: torch.Tensor, micro_batch_size: int, per_microbatch, progress: bool = True,
                    desc: str = "perplexity") -> tuple[list, float]:
    """This data-parallel rank's share of `windows` ([n, seq_len + 1]; rank r takes windows r, r + dp, ...) through
    megatron's schedule in micro-batches of inputs [:, :-1] and labels [:, 1:], with a progress bar in tokens.
    Returns `per_microbatch(output, micro_batch)` of every micro-batch (on the last pipeline stage; empty elsewhere)
    and the seconds taken."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = windows[dp_rank::dp]
    micro_batches = [{"tokens": w[:, :-1], "labels": w[:, 1:]} for w in mine.split(micro_batch_size)]
    results: list = []
    start = time.perf_counter()
    bar = tqdm(total=len(mine) * (windows.shape[1] - 1), unit="tok", desc=desc, leave=False,
               disable=not (progress and parallel.is_main_process()))
    # One schedule call per group of micro-batches keeps the pipeline full; the ragged tail
    # (fewer windows than micro_batch_size) goes alone because shapes must match in a call.
    full = [mb for mb in micro_batches if len(mb["tokens"]) == micro_batch_size]
    ragged = [mb for mb in micro_batches if len(mb["tokens"]) != micro_batch_size]
    for group in [full[i : i + 8] for i in range(0, len(full), 8)] + [[mb] for mb in ragged]:
        results += forward_microbatches(model, group, per_microbatch)
        bar.update(sum(mb["labels"].numel() for mb in group))
    bar.close()
    return results, time.perf_counter() - start


def evaluate_perplexity(model, windows: torch.Tensor, micro_batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity over `windows` ([n, seq_len + 1]); windows are split over data-parallel ranks."""
    from megatron.core import parallel_state as ps

    nlls, seconds = forward_windows(model, windows, micro_batch_size,
                                    lambda logits, mb: vocab_parallel_token_nll(logits, mb["labels"]), progress)
    totals = torch.tensor([sum(nll.double().sum().item() for nll in nlls), sum(nll.numel() for nll in nlls)],
                          dtype=torch.float64)
    if dist.is_initialized():
        # Sum over DP replicas; PP stages other than the last contributed zeros, so sum over all
        # ranks and divide out the TP copies of the same numbers.
        dist.all_reduce(totals)
        totals /= ps.get_tensor_model_parallel_world_size()
    mean_nll = (totals[0] / totals[1]).item()
    tokens = int(totals[1].item())
    return PerplexityResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=tokens, windows=len(windows), seq_len=windows.shape[1] - 1,
        seconds=seconds, tokens_per_s=tokens / seconds,
    )
