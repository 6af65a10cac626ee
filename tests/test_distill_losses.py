"""Vocab-parallel logit losses: at TP=1 and TP=2 (each rank holding half the vocabulary) the values
and the gradients equal the naive full-vocabulary definition, for every loss kind (whole vocabulary
and top k + tail bucket), with chunking and a loss mask; the same losses from a `TopKTeacher` (what a
teacher cache holds) equal the online ones; plus the cosine loss and bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from distributed import run_distributed
from nemo_minitron.distill.losses import LOGIT_LOSSES, LogitLoss, cosine_loss, logit_losses, reference_logit_losses

VOCAB = 64
SPECS = [
    LogitLoss("fwd_kl"),
    LogitLoss("fwd_kl", temperature=2.0, lm_weight=0.5),
    LogitLoss("rev_kl", temperature=1.5),
    LogitLoss("jsd"),
    LogitLoss("topk_kl", top_k=7),
    LogitLoss("topk_kl", top_k=7, temperature=2.0),
    LogitLoss("fwd_kl", top_k=7, lm_weight=0.5),
    LogitLoss("rev_kl", top_k=5, temperature=1.5),
    LogitLoss("jsd", top_k=VOCAB),
]
# What a teacher cache computes with: it holds all VOCAB logits, truncated to each loss's top_k.
CACHED_SPECS = [s for s in SPECS if s.top_k is not None and (s.kind == "topk_kl" or s.temperature == 1.0)]


def _inputs():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 9, VOCAB, generator=g) * 3
    teacher = torch.randn(2, 9, VOCAB, generator=g) * 3
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    mask = (torch.rand(2, 9, generator=g) > 0.2).float()
    return student, teacher, labels, mask


def reference(spec):
    student, teacher, labels, mask = _inputs()
    student.requires_grad_(True)
    out = reference_logit_losses(student, teacher, labels, mask, spec)
    out["objective"].backward()
    return {k: v.detach() for k, v in out.items()}, student.grad


def sharded(specs):
    """Every spec on this rank's vocabulary shard; chunks of 5 tokens (not dividing 18)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    results = []
    for spec in specs:
        student, teacher, labels, mask = _inputs()
        shard = lambda x: x.chunk(tp, dim=-1)[rank].contiguous()  # noqa: E731
        local = shard(student).requires_grad_(True)
        out = logit_losses(local, shard(teacher), labels, mask, spec, chunk_tokens=5)
        (out["objective"] * 3.0).backward()  # an outer factor must scale the gradient
        results.append(({k: v.detach() for k, v in out.items()}, local.grad / 3.0))
    return results


def sharded_cached(specs, k: int):
    """`sharded`, with the teacher as the `TopKTeacher` of its top `k` logits (as a cache holds it)."""
    from megatron.core import parallel_state as ps

    from nemo_minitron.distill.losses import TopKTeacher, teacher_top_k

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    results = []
    for spec in specs:
        student, teacher, labels, mask = _inputs()
        shard = lambda x: x.chunk(tp, dim=-1)[rank].contiguous()  # noqa: E731
        top = teacher_top_k(shard(teacher).reshape(-1, VOCAB // tp), k)
        cached = TopKTeacher(top.values.view(2, 9, k), top.indices.view(2, 9, k), top.log_partition.view(2, 9),
                             top.log_tail.view(2, 9))
        local = shard(student).requires_grad_(True)
        out = logit_losses(local, cached, labels, mask, spec, chunk_tokens=5)
        out["objective"].backward()
        results.append(({k: v.detach() for k, v in out.items()}, local.grad, top))
    return results


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_values_and_grads_equal_full_vocabulary_definition(tp):
    per_rank = run_distributed(sharded, world_size=tp, tp=tp, args=(SPECS,))
    for i, spec in enumerate(SPECS):
        ref_values, ref_grad = reference(spec)
        for rank, results in enumerate(per_rank):
            values, grad = results[i]
            for key in ("objective", "kd_loss", "lm_loss"):
                torch.testing.assert_close(values[key], ref_values[key], rtol=1e-5, atol=1e-6, msg=f"{spec} {key}")
            torch.testing.assert_close(grad, ref_grad.chunk(tp, dim=-1)[rank], rtol=1e-4, atol=1e-7, msg=str(spec))
            assert grad.abs().sum() > 0


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_cached_top_k_equals_online_loss(tp):
    """The teacher's sorted logits, log-partition and tail mass reproduce torch.topk exactly, and
    every top-k loss computed from them (truncated to the loss's k) equals the online loss."""
    per_rank = run_distributed(sharded_cached, world_size=tp, tp=tp, args=(CACHED_SPECS, VOCAB))
    _, teacher, _, _ = _inputs()
    flat = teacher.reshape(-1, VOCAB)
    expected = flat.topk(VOCAB, dim=-1)
    for i, spec in enumerate(CACHED_SPECS):
        ref_values, ref_grad = reference(spec)
        for rank, results in enumerate(per_rank):
            values, grad, top = results[i]
            assert torch.equal(top.values, expected.values) and torch.equal(top.indices, expected.indices)
            torch.testing.assert_close(top.log_partition, torch.logsumexp(flat, -1))
            assert top.log_tail.exp().max() < 1e-6  # nothing outside all VOCAB
            probs = torch.softmax(flat, -1)
            tail_7 = probs.sum(-1) - probs.gather(-1, expected.indices[:, :7]).sum(-1)
            torch.testing.assert_close(top.truncated(7).log_tail.exp(), tail_7, rtol=1e-4, atol=1e-6)
            for key in ("objective", "kd_loss", "lm_loss"):
                torch.testing.assert_close(values[key], ref_values[key], rtol=1e-5, atol=1e-6, msg=f"{spec} {key}")
            torch.testing.assert_close(grad, ref_grad.chunk(tp, dim=-1)[rank], rtol=1e-4, atol=1e-7, msg=str(spec))


def test_top_k_tail_bounds_the_full_divergence():
    """Coarsening to the top k + one tail outcome never raises a divergence (data processing) and
    loses nothing at k = vocabulary."""
    student, teacher, labels, mask = _inputs()
    for kind in ("fwd_kl", "rev_kl", "jsd"):
        full = reference_logit_losses(student, teacher, labels, mask, LogitLoss(kind))["kd_loss"]
        values = [reference_logit_losses(student, teacher, labels, mask, LogitLoss(kind, top_k=k))["kd_loss"]
                  for k in (1, 8, 32, VOCAB)]
        assert all(a <= b + 1e-6 for a, b in zip(values, values[1:])), (kind, values)
        torch.testing.assert_close(values[-1], full)
        assert values[0] < 0.9 * full


def test_reference_matches_textbook_formulas():
    student, teacher, labels, mask = _inputs()
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    fwd = reference_logit_losses(student, teacher, labels, mask, LogitLoss("fwd_kl"))["kd_loss"]
    rev = reference_logit_losses(student, teacher, labels, mask, LogitLoss("rev_kl"))["kd_loss"]
    jsd = reference_logit_losses(student, teacher, labels, mask, LogitLoss("jsd"))["kd_loss"]
    torch.testing.assert_close(fwd, mean((p * (p / q).log()).sum(-1)))
    torch.testing.assert_close(rev, mean((q * (q / p).log()).sum(-1)))
    m = (p + q) / 2
    torch.testing.assert_close(jsd, mean(0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)))
    assert 0 < jsd < math.log(2)
    # top-k with k = vocab is the full forward KL; identical logits give zero loss
    full = reference_logit_losses(student, teacher, labels, mask, LogitLoss("topk_kl", top_k=VOCAB))["kd_loss"]
    torch.testing.assert_close(full, fwd)
    assert reference_logit_losses(teacher, teacher, labels, mask, LogitLoss("rev_kl"))["kd_loss"].abs() < 1e-6


def test_cosine_loss():
    h = torch.randn(5, 2, 8)
    assert cosine_loss(h, 3 * h).abs() < 1e-6
    torch.testing.assert_close(cosine_loss(h, -h), torch.tensor(2.0))


@pytest.mark.parametrize("kwargs,key", [
    (dict(kind="kl"), "loss.kind"),
    (dict(temperature=0.0), "loss.temperature"),
    (dict(kind="topk_kl"), "loss.top_k"),
    (dict(kind="fwd_kl", top_k=0), "loss.top_k"),
    (dict(lm_weight=-1.0), "loss.lm_weight"),
])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LogitLoss(**kwargs)


def test_kinds_are_all_covered():
    assert {s.kind for s in SPECS} == set(LOGIT_LOSSES)
