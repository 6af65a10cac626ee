"""How activations become one score per channel: aggregate over the sequence, then over the batch.

A hook sees a [s, b, c] activation. `Aggregation.over_sequence` turns it into one value per sample
and channel ([b, c]); `BatchStats` accumulates sufficient statistics of those values (count, sum,
sum of squares) so that micro-batches, data-parallel replicas, TP shards and pipeline stages can
all be combined by plain summation before `Aggregation.over_batch` finishes the score.
Default: seq = mean of |x|, batch = L2 (paper 2407.14679, the best of its combinations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nemo_minitron.errors import UserError
REDUCTIONS = ("mean", "l2", "var")
HEAD_SIGNALS = ("output", "input")


@dataclass
class Aggregation:
    """seq / batch reduction: "mean" (of |x| over the sequence), "l2" or "var"; and what a head's
    activation is: "input" = its slice of the `linear_proj` input (the attention output, as in the
    paper), "output" = that slice times the head's `linear_proj` columns, i.e. what the head adds to
    the residual stream (the default: it ranks heads within a group better, docs/pruning.md)."""

    seq: str = "mean"   # mean (of |x|) | l2 | var over the sequence
    batch: str = "l2"   # mean | l2 | var over samples
    heads: str = "output"   # output: what each head adds to the residual stream | input: linear_proj input (paper)

    def __post_init__(self):
        for key in ("seq", "batch"):
            if getattr(self, key) not in REDUCTIONS:
                raise UserError(f"aggregation.{key}={getattr(self, key)!r} is not one of {list(REDUCTIONS)}")
        if self.heads not in HEAD_SIGNALS:
            raise UserError(f"aggregation.heads={self.heads!r} is not one of {list(HEAD_SIGNALS)}")

    def over_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[s, b, c] activations -> [b, c] per-sample scores (computed in fp32)."""
        x = x.float()
        if self.seq == "mean":
            return x.abs().mean(0)
        if self.seq == "l2":
            return x.norm(dim=0)
        return x.var(0, unbiased=False)

    def over_batch(self, stats: "BatchStats") -> torch.Tensor:
        """Finish the score from summed statistics; the sample count broadcasts over channels."""
        n = stats.count.clamp(min=1).view(-1, *([1] * (stats.total.dim() - 1)))
        if self.batch == "l2":
            return stats.squares.sqrt()
        mean = stats.total / n
        if self.batch == "mean":
            return mean
        return (stats.squares / n - mean.square()).clamp(min=0)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class BatchStats:
    """count [L], sum and sum of squares [L, ...] of per-sample scores, in float64 so that the
    order of summation (micro-batches, DP replicas) does not change the result measurably."""

    def __init__(self, shape: tuple[int, ...]):
        self.count = torch.zeros(shape[0], dtype=torch.float64)
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.squares = torch.zeros(shape, dtype=torch.float64)

    def add(self, layer: int, per_sample: torch.Tensor, index: slice | tuple = slice(None)) -> None:
        """Add [b, ...] per-sample values into row `layer` (at `index` within the row)."""
        per_sample = per_sample.detach().double().cpu()
        self.total[layer][index] += per_sample.sum(0)
        self.squares[layer][index] += per_sample.square().sum(0)

    def count_samples(self, layer: int, n: int) -> None:
        self.count[layer] += n

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.total, self.squares]
