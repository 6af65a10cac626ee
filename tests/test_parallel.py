"""Forward and backward through megatron's pipeline schedule on CPU: the loss and every gradient
at TP=2, PP=2 and TP=2 x PP=2 equal those at TP=1 x PP=1 (the same global weights, resharded)."""

from __future__ import annotations

import pytest
import torch

from distributed import run_distributed
from nemo_minitron.models import bridge
from tiny import hf_model, tiny_arch

BATCHES = torch.randint(0, 320, (4, 2, 17), generator=torch.Generator().manual_seed(3))


def loss_and_grads(arch, global_sd):
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.models.runner import forward_microbatches, vocab_parallel_token_nll

    model = build_gpt_model(arch)
    bridge.load_global(model, global_sd)
    micro_batches = [{"tokens": b[:, :-1], "labels": b[:, 1:]} for b in BATCHES]
    losses = forward_microbatches(
        model, micro_batches, lambda logits, mb: vocab_parallel_token_nll(logits, mb["labels"]).mean(),
        forward_only=False,
    )
    return (torch.stack(losses).mean() if losses else None), bridge.gather_global(model, grads=True)


@pytest.fixture(scope="module")
def reference():
    arch = tiny_arch(tie=False)
    global_sd = bridge.hf_to_global(arch, hf_model(arch).state_dict())
    [(loss, grads)] = run_distributed(loss_and_grads, world_size=1, args=(arch, global_sd))
    return arch, global_sd, loss, grads


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_grads_match_single_rank(reference, tp, pp):
    arch, global_sd, ref_loss, ref_grads = reference
    results = run_distributed(loss_and_grads, world_size=tp * pp, tp=tp, pp=pp, args=(arch, global_sd))
    losses = [loss for loss, _ in results if loss is not None]
    assert len(losses) == tp  # the last stage's TP ranks
    for loss in losses:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for _, grads in results:
        assert grads.keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_srun_without_torchrun_derives_rendezvous(monkeypatch):
    from nemo_minitron import parallel

    # A copy of the environment: what the function sets must not outlive the test (a RANK left
    # behind would make every later world of one in this process wait for its other ranks).
    monkeypatch.setattr(parallel.os, "environ", dict(parallel.os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "1")
    parallel._slurm_to_torch_env()
    assert (parallel.os.environ["RANK"], parallel.os.environ["WORLD_SIZE"], parallel.os.environ["LOCAL_RANK"]) == ("3", "8", "1")
    assert parallel.os.environ["MASTER_ADDR"] == "127.0.0.1"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02]")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the job script must export MASTER_ADDR
    with pytest.raises(ValueError, match="export MASTER_ADDR"):
        parallel._slurm_to_torch_env()
