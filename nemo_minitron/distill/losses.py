"""Logit distillation losses on vocab-parallel logits, chunked over tokens.

Each TP rank holds a [tokens, vocab/tp] shard of the student and teacher logits. Per token, with
p = softmax(teacher / T) and q = softmax(student / T) over the whole vocabulary:

    fwd_kl   KL(p || q) = sum p (log p - log q)        (default; Minitron: T = 1 is best)
    rev_kl   KL(q || p) = sum q (log q - log p)
    jsd      (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
    topk_kl  KL(p_k || q_k), both renormalised over the teacher's top-k tokens (ties at the k-th
             largest teacher logit are all kept)

scaled by T^2 (so gradient magnitudes do not shrink with T), averaged over the tokens of the loss
mask. The LM loss (cross-entropy of the student at T = 1 against the labels) comes out of the same
pass, for mixing in and as a metric.

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

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
LOGIT_LOSSES = ("fwd_kl", "rev_kl", "jsd", "topk_kl")
# Logits outside the top-k set: exp() underflows to exactly 0, log-probabilities stay finite.
_EXCLUDED = -1e30


def _tp():
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
            ps.get_tensor_model_parallel_group())


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log softmax over the vocabulary split across TP ranks; exact forward and backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor) -> torch.Tensor:
        tp, _, group = _tp()
        peak = logits.max(dim=-1, keepdim=True).values
        if tp > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - peak
        total = shifted.exp().sum(dim=-1, keepdim=True)
        if tp > 1:
            dist.all_reduce(total, group=group)
        out = shifted - total.log()
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


def vocab_parallel_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return _VocabParallelLogSoftmax.apply(logits)


def _vocab_sum(values: torch.Tensor) -> torch.Tensor:
    """Per-token sum over the global vocabulary of a per-rank [n, v/tp] tensor -> [n]."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(values.sum(dim=-1))


def _picked(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_probs[i, labels[i]] for vocab-parallel [n, v/tp] log-probabilities -> [n]."""
    tp, rank, _ = _tp()
    width = log_probs.shape[-1]
    local = labels - rank * width
    mine = (local >= 0) & (local < width)
    values = log_probs.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    values = torch.where(mine, values, torch.zeros_like(values))
    return _vocab_sum(values.unsqueeze(-1)) if tp > 1 else values


def _top_k_mask(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Where the teacher's logit is among its k largest over the global vocabulary."""
    tp, _, group = _tp()
    if k > teacher.shape[-1] * tp:
        raise UserError(f"loss.top_k={k} exceeds the vocabulary size {teacher.shape[-1] * tp}")
    local = teacher.topk(min(k, teacher.shape[-1]), dim=-1).values
    if tp > 1:
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=group)
        local = torch.cat(shards, dim=-1)
    threshold = local.topk(k, dim=-1).values[..., -1:]
    return teacher >= threshold


@dataclass(frozen=True)
class LogitLoss:
    """Which logit loss, at what temperature, and how much LM loss is mixed in."""

    kind: str = "fwd_kl"
    temperature: float = 1.0
    top_k: int | None = None     # topk_kl only
    lm_weight: float = 0.0       # objective = logit loss + lm_weight * cross-entropy

    def __post_init__(self):
        if self.kind not in LOGIT_LOSSES:
            raise UserError(f"loss.kind={self.kind!r} is not one of {', '.join(LOGIT_LOSSES)}")
        if self.temperature <= 0:
            raise UserError(f"loss.temperature={self.temperature} must be positive")
        if (self.kind == "topk_kl") != (self.top_k is not None):
            raise UserError("loss.top_k is required by loss.kind=topk_kl and only used by it")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"loss.top_k={self.top_k} must be at least 1")
        if self.lm_weight < 0:
            raise UserError(f"loss.lm_weight={self.lm_weight} must not be negative")

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit loss, LM loss) per token for fp32 [n, v/tp] logit shards and [n] labels."""
        t = self.temperature
        log_q1 = vocab_parallel_log_softmax(student)
        lm = -_picked(log_q1, labels)
        if self.kind == "topk_kl":
            keep = _top_k_mask(teacher, self.top_k)
            student = torch.where(keep, student, torch.full_like(student, _EXCLUDED))
            teacher = torch.where(keep, teacher, torch.full_like(teacher, _EXCLUDED))
        log_q = log_q1 if t == 1.0 and self.kind != "topk_kl" else vocab_parallel_log_softmax(student / t)
        log_p = vocab_parallel_log_softmax(teacher / t)
        if self.kind in ("fwd_kl", "topk_kl"):
            kd = _vocab_sum(log_p.exp() * (log_p - log_q))
        elif self.kind == "rev_kl":
            kd = _vocab_sum(log_q.exp() * (log_q - log_p))
        else:
            log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
            kd = 0.5 * _vocab_sum(log_p.exp() * (log_p - log_m) + log_q.exp() * (log_q - log_m))
        return kd * t * t, lm


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
                kd, lm = spec.per_token(chunk, teacher[start:end].float(), labels[start:end])
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


def logit_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                 loss_mask: torch.Tensor | None, spec: LogitLoss, chunk_tokens: int = 128) -> dict[str, torch.Tensor]:
    """Mean over the loss-mask tokens of the distillation objective and its parts.

    `student`, `teacher`: [b, s, v/tp] logit shards; `labels`, `loss_mask`: [b, s]. Returns
    {"objective" (differentiable w.r.t. the student logits), "kd_loss", "lm_loss"} scalars.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    v = student.shape[-1]
    mask = torch.ones(labels.shape, device=student.device) if loss_mask is None else loss_mask.float()
    weights = (mask / mask.sum().clamp(min=1.0)).reshape(-1)
    objective, parts = _ChunkedLogitLoss.apply(student.reshape(-1, v), teacher.reshape(-1, v).detach(),
                                               labels.reshape(-1), weights, spec, chunk_tokens)
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
