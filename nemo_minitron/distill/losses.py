"""Logit distillation losses on vocab-parallel logits, chunked over tokens.

Each TP rank holds a [tokens, vocab/tp] shard of the student and teacher logits. Per token, with
p = softmax(teacher / T) and q = softmax(student / T) over the whole vocabulary:

    fwd_kl   KL(p || q) = sum p (log p - log q)        (default; Minitron: T = 1 is best)
    rev_kl   KL(q || p) = sum q (log q - log p)
    jsd      (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
    topk_kl  KL(p_k || q_k), both renormalised over the teacher's top-k tokens

scaled by T^2 (so gradient magnitudes do not shrink with T), averaged over the tokens of the loss
mask. With `top_k` set, fwd_kl, rev_kl and jsd compare coarsened distributions instead: the
teacher's top-k tokens, each its own outcome, plus one outcome for the rest of the vocabulary
(probability mass 1 - sum over the top k), for both p and q. By the data-processing inequality
that is a lower bound of the full divergence, equal to it at k = vocabulary size; it is what an
offline teacher cache (`distill.teacher_cache`) can compute, since it keeps per token only the top-k
logits, their ids, the log-partition and the log of the tail's mass (`TopKTeacher`). The top k are
exactly k tokens, torch.topk's choice among logits tied at the k-th place. The LM loss
(cross-entropy of the student at T = 1 against the labels) comes out of the same pass, for mixing
in and as a metric.

How TP works: the only cross-rank coupling of a per-token loss is the softmax normaliser, and
`_VocabParallelLogSoftmax` computes it with all-reduces (max, sum of exp) and a backward that
all-reduces the sum of incoming gradients -- the full Jacobian of log-softmax over the global
vocabulary. Everything after it is elementwise on the local shard, and the per-token sum over the
vocabulary is megatron's `reduce_from_tensor_model_parallel_region`, whose identity backward is
right *there*: the summed value is the (replicated) loss, and each rank's partial sum gets gradient
one. (An identity-backward all-reduce inside the normaliser would be wrong: docs/design.md section 4.)

How memory stays bounded: `_ChunkedLogitLoss` walks the tokens in chunks, computes each chunk's
loss in fp32 and immediately its gradient with respect to that chunk of student logits, and keeps
only that gradient (one logits-sized buffer) for the backward pass. Full fp32 softmaxes of the
whole sequence are never materialised, let alone saved for backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError

LOGIT_LOSSES = ("fwd_kl", "rev_kl", "jsd", "topk_kl")
_TINY = 1e-30  # the least probability mass of a tail bucket (fp32 keeps it: its smallest normal is 1.2e-38)


def _tp():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log softmax over the vocabulary split across TP ranks; exact forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        out = logits - log_partition(logits).unsqueeze(-1)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        tp, _, group = _tp()
        total = grad.sum(dim=-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(total, group=group)
        return grad - out.exp() * total


def log_partition(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the global vocabulary of vocab-parallel [n, v/tp] logits -> [n] (no grad)."""
    tp, _, group = _tp()
    peak = logits.max(dim=-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = (logits - peak).exp().sum(dim=-1, keepdim=True)
    if tp > 1:
        dist.all_reduce(total, group=group)
    return (peak + total.log()).squeeze(-1)


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return _VocabParallelLogSoftmax.apply(logits)


def _vocab_sum(values: torch.Tensor) -> torch.Tensor:
    """Per-token sum over the global vocabulary of a per-rank [n, v/tp] tensor -> [n]."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(values.sum(dim=-1))


def _local_ids(index: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global vocabulary ids -> (ids within this TP rank's shard of `width`, clamped; whether the
    rank holds them)."""
    _, rank, _ = _tp()
    local = index - rank * width
    return local.clamp(0, width - 1), (local >= 0) & (local < width)


def _gathered(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[i, index[i, j]] for a vocab-parallel [n, v/tp] tensor and global ids [n, k] -> [n, k]
    on every rank (differentiable: each rank's gradient lands on the entries it holds)."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    local, mine = _local_ids(index, values.shape[-1])
    picked = torch.where(mine, values.gather(-1, local), torch.zeros((), dtype=values.dtype, device=values.device))
    return reduce_from_tensor_model_parallel_region(picked) if _tp()[0] > 1 else picked


def _picked(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_probs[i, labels[i]] for vocab-parallel [n, v/tp] log-probabilities -> [n]."""
    return _gathered(log_probs, labels.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class TopKTeacher:
    """What a top-k loss needs of the teacher, per token: its k largest logits (descending) and
    their global vocabulary ids, the log-partition log Z = logsumexp of all its logits, and the log
    of its probability mass outside the top k (-inf when k is the whole vocabulary). Shapes
    [..., k] and [...]; logits as the teacher computed them, the rest fp32, at temperature 1."""

    values: torch.Tensor
    indices: torch.Tensor
    log_partition: torch.Tensor
    log_tail: torch.Tensor
    # field -> the key of a training batch that carries it (teacher caches)
    BATCH_KEYS: ClassVar[dict[str, str]] = {name: f"teacher_{name}" for name in
                                            ("values", "indices", "log_partition", "log_tail")}

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> "TopKTeacher":
        missing = [key for key in cls.BATCH_KEYS.values() if key not in batch]
        if missing:
            raise UserError(f"the batch has no teacher logits ({', '.join(missing)}): distilling a student without "
                            f"its teacher needs samples from a teacher cache")
        return cls(**{name: batch[key] for name, key in cls.BATCH_KEYS.items()})

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __getitem__(self, rows) -> "TopKTeacher":
        return TopKTeacher(self.values[rows], self.indices[rows], self.log_partition[rows], self.log_tail[rows])

    def flatten(self) -> "TopKTeacher":
        """[n, k] / [n] over all leading dimensions."""
        return TopKTeacher(self.values.reshape(-1, self.k), self.indices.reshape(-1, self.k),
                           self.log_partition.reshape(-1), self.log_tail.reshape(-1))

    def truncated(self, k: int) -> "TopKTeacher":
        """The top `k` <= self.k, the dropped tokens' mass moved into the tail."""
        if k > self.k:
            raise UserError(f"loss.top_k={k} exceeds the {self.k} logits per token that the teacher cache holds")
        if k == self.k:
            return self
        dropped = self.values[..., k:].float() - self.log_partition.unsqueeze(-1)
        log_tail = torch.logsumexp(torch.cat([dropped, self.log_tail.unsqueeze(-1)], dim=-1), dim=-1)
        return TopKTeacher(self.values[..., :k], self.indices[..., :k], self.log_partition, log_tail)


def _holds(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Boolean [n, v/tp] like `like`: whether each of this rank's vocabulary entries is among the
    global ids `index` [n, k]."""
    local, mine = _local_ids(index, like.shape[-1])
    return torch.zeros(like.shape, device=like.device).scatter_add_(-1, local, mine.float()) > 0


def teacher_top_k(logits: torch.Tensor, k: int) -> TopKTeacher:
    """The `TopKTeacher` of vocab-parallel [n, v/tp] teacher logits (the same on every TP rank)."""
    tp, rank, group = _tp()
    width = logits.shape[-1]
    if k > width * tp:
        raise UserError(f"top_k={k} exceeds the vocabulary size {width * tp}")
    values, index = logits.topk(min(k, width), dim=-1)
    index = index + rank * width
    if tp > 1:  # the global top k are among the ranks' local top k
        value_shards = [torch.empty_like(values) for _ in range(tp)]
        index_shards = [torch.empty_like(index) for _ in range(tp)]
        dist.all_gather(value_shards, values.contiguous(), group=group)
        dist.all_gather(index_shards, index.contiguous(), group=group)
        values, order = torch.cat(value_shards, dim=-1).topk(k, dim=-1)
        index = torch.cat(index_shards, dim=-1).gather(-1, order)
    logits = logits.float()
    log_z = log_partition(logits)
    tail = _vocab_sum(torch.where(_holds(index, logits), torch.zeros((), device=logits.device),
                                  (logits - log_z.unsqueeze(-1)).exp()))
    return TopKTeacher(values, index, log_z, tail.log())


def _divergence_terms(kind: str, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-outcome terms of `kind` that sum to the divergence of the distributions p and q."""
    if kind in ("fwd_kl", "topk_kl"):
        return log_p.exp() * (log_p - log_q)
    if kind == "rev_kl":
        return log_q.exp() * (log_q - log_p)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * (log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m))


@dataclass(frozen=True)
class LogitLoss:
    """Which logit loss, at what temperature, and how much LM loss is mixed in."""

    kind: str = "fwd_kl"
    temperature: float = 1.0
    top_k: int | None = None     # topk_kl: required; others: top k + tail bucket (None: whole vocabulary)
    lm_weight: float = 0.0       # objective = logit loss + lm_weight * cross-entropy

    def __post_init__(self):
        if self.kind not in LOGIT_LOSSES:
            raise UserError(f"loss.kind={self.kind!r} is not one of {', '.join(LOGIT_LOSSES)}")
        if self.temperature <= 0:
            raise UserError(f"loss.temperature={self.temperature} must be positive")
        if self.kind == "topk_kl" and self.top_k is None:
            raise UserError("loss.kind=topk_kl needs loss.top_k")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"loss.top_k={self.top_k} must be at least 1")
        if self.lm_weight < 0:
            raise UserError(f"loss.lm_weight={self.lm_weight} must not be negative")

    def check_cached(self, cached_k: int) -> None:
        """UserError unless this loss can be computed from a teacher cache of `cached_k` logits per
        token (which holds the tail's mass at temperature 1 only)."""
        if self.top_k is None:
            raise UserError(f"a teacher cache holds the teacher's top {cached_k} logits per token, not the whole "
                            f"vocabulary: set loss.top_k (at most {cached_k})")
        if self.top_k > cached_k:
            raise UserError(f"loss.top_k={self.top_k} exceeds the {cached_k} logits per token that the teacher "
                            f"cache holds")
        if self.kind != "topk_kl" and self.temperature != 1.0:
            raise UserError(f"loss.kind={self.kind} with a teacher cache needs loss.temperature=1 (the cache holds "
                            f"the tail's mass at temperature 1); loss.kind=topk_kl works at any temperature")

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor | TopKTeacher,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit loss, LM loss) per token for fp32 [n, v/tp] student logit shards, the teacher's
        [n, v/tp] logit shards or its `TopKTeacher` [n, k], and [n] labels."""
        t = self.temperature
        log_q1 = vocab_parallel_log_softmax(student)
        lm = -_picked(log_q1, labels)
        if self.top_k is not None or isinstance(teacher, TopKTeacher):  # the latter needs top_k: check_cached says so
            kd = self._top_k_divergence(student, log_q1, teacher)
        else:
            log_q = log_q1 if t == 1.0 else vocab_parallel_log_softmax(student / t)
            log_p = vocab_parallel_log_softmax(teacher.float() / t)
            kd = _vocab_sum(_divergence_terms(self.kind, log_p, log_q))
        return kd * t * t, lm

    def _top_k_divergence(self, student: torch.Tensor, log_q1: torch.Tensor,
                          teacher: torch.Tensor | TopKTeacher) -> torch.Tensor:
        """topk_kl over the renormalised top k, or the kind's divergence over the top k + the tail."""
        t = self.temperature
        if isinstance(teacher, TopKTeacher):
            self.check_cached(teacher.k)
            top = teacher.truncated(self.top_k)
        else:  # topk_kl renormalises the teacher's top k, so only the tail bucket needs tempered logits
            top = teacher_top_k(teacher.float() / (1.0 if self.kind == "topk_kl" else t), self.top_k)
        if self.kind == "topk_kl":
            log_p = torch.log_softmax(top.values.float() / t, dim=-1)
            log_q = torch.log_softmax(_gathered(student, top.indices) / t, dim=-1)
            return _divergence_terms(self.kind, log_p, log_q).sum(-1)
        log_q = log_q1 if t == 1.0 else vocab_parallel_log_softmax(student / t)
        q_tail = _vocab_sum(torch.where(_holds(top.indices, log_q), torch.zeros((), device=log_q.device), log_q.exp()))
        # Tail masses are kept at least _TINY: an empty tail (k = vocabulary) then adds 0 to every
        # divergence, and no infinity reaches a gradient.
        log_p = torch.cat([top.values.float() - top.log_partition.unsqueeze(-1),
                           top.log_tail.clamp(min=math.log(_TINY)).unsqueeze(-1)], dim=-1)
        log_q = torch.cat([_gathered(log_q, top.indices), q_tail.clamp(min=_TINY).log().unsqueeze(-1)], dim=-1)
        return _divergence_terms(self.kind, log_p, log_q).sum(-1)


class _ChunkedLogitLoss(torch.autograd.Function):
    """Sum over tokens of weighted per-token losses, with the student-logit gradient computed
    chunk by chunk in the forward pass (see the module docstring).

    Returns the objective (differentiable) and the detached [kd, lm] parts.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, weights, spec: LogitLoss, chunk_tokens: int):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if need_grad else None
        sums = torch.zeros(3, dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_tokens):
            end = start + chunk_tokens
            chunk = student[start:end].detach().float().requires_grad_(need_grad)
            with torch.set_grad_enabled(need_grad):
                kd, lm = spec.per_token(chunk, teacher[start:end], labels[start:end])
                w = weights[start:end]
                kd, lm = (kd * w).sum(), (lm * w).sum()
                objective = kd + spec.lm_weight * lm if spec.lm_weight else kd
            if need_grad:
                (grad[start:end],) = torch.autograd.grad(objective, chunk)
            sums += torch.stack([objective.detach(), kd.detach(), lm.detach()])
        ctx.save_for_backward(grad)
        parts = sums[1:].clone()
        ctx.mark_non_differentiable(parts)
        return sums[0].clone(), parts

    @staticmethod
    def backward(ctx, grad_objective, grad_parts):
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is used once (no double backward), and a copy would cost
        # another logits-sized buffer.
        return grad.mul_(grad_objective.to(grad.dtype)), None, None, None, None, None


def logit_losses(student: torch.Tensor, teacher: torch.Tensor | TopKTeacher, labels: torch.Tensor,
                 loss_mask: torch.Tensor | None, spec: LogitLoss, chunk_tokens: int = 128) -> dict[str, torch.Tensor]:
    """Mean over the loss-mask tokens of the distillation objective and its parts.

    `student`: [b, s, v/tp] logit shards; `teacher`: the same, or a `TopKTeacher` [b, s, k] from a
    teacher cache; `labels`, `loss_mask`: [b, s]. Returns {"objective" (differentiable w.r.t. the
    student logits), "kd_loss", "lm_loss"} scalars.
    """
    expected = student.shape if isinstance(teacher, torch.Tensor) else student.shape[:-1]
    found = teacher.shape if isinstance(teacher, torch.Tensor) else teacher.log_partition.shape
    if found != expected:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher {tuple(found)} do not line up")
    v = student.shape[-1]
    mask = torch.ones(labels.shape, device=student.device) if loss_mask is None else loss_mask.float()
    weights = (mask / mask.sum().clamp(min=1.0)).reshape(-1)
    teacher = teacher.reshape(-1, v).detach() if isinstance(teacher, torch.Tensor) else teacher.flatten()
    objective, parts = _ChunkedLogitLoss.apply(student.reshape(-1, v), teacher, labels.reshape(-1), weights, spec,
                                               chunk_tokens)
    return {"objective": objective, "kd_loss": parts[0], "lm_loss": parts[1]}


def reference_logit_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                           loss_mask: torch.Tensor | None, spec: LogitLoss) -> dict[str, torch.Tensor]:
    """The same quantities, naively: full-vocabulary [b, s, v] logits on one rank, torch's
    log_softmax and autograd, everything materialised. The definition the tests and the memory
    benchmark compare against."""
    t = spec.temperature
    student, teacher = student.float(), teacher.float()
    lm = torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    if spec.kind == "topk_kl":  # both distributions over exactly the teacher's top-k tokens
        index = teacher.topk(spec.top_k, dim=-1).indices
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    log_q = torch.log_softmax(student / t, dim=-1)
    log_p = torch.log_softmax(teacher / t, dim=-1)
    if spec.top_k is not None and spec.kind != "topk_kl":  # the top k + one outcome for the rest
        index = teacher.topk(spec.top_k, dim=-1).indices
        outside = torch.ones_like(teacher, dtype=torch.bool).scatter(-1, index, False)

        def coarse(log_probs):
            tail = (log_probs.exp() * outside).sum(-1, keepdim=True).clamp(min=1e-30)
            return torch.cat([log_probs.gather(-1, index), tail.log()], dim=-1)

        log_p, log_q = coarse(log_p), coarse(log_q)

    def kl(log_a, log_b):  # KL(a || b) per token
        return torch.nn.functional.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)

    if spec.kind in ("fwd_kl", "topk_kl"):
        kd = kl(log_p, log_q)
    elif spec.kind == "rev_kl":
        kd = kl(log_q, log_p)
    else:
        log_m = torch.log((log_p.exp() + log_q.exp()) / 2)
        kd = 0.5 * (kl(log_p, log_m) + kl(log_q, log_m))
    kd = kd * t * t
    mask = torch.ones_like(lm) if loss_mask is None else loss_mask.float()

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    return {"objective": mean(kd) + spec.lm_weight * mean(lm), "kd_loss": mean(kd), "lm_loss": mean(lm)}


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(student, teacher) along the hidden dimension (fp32)."""
    cos = torch.nn.functional.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return (1.0 - cos).mean()
