"""Distillation with teacher and student on the same ranks: the same loss curve and weights at TP=2,
PP=2, and TP=2 and TP=2 x PP=2 with sequence parallelism as at TP=1 (with intermediate losses
carried between pipeline stages), bf16 mixed precision tracking fp32 at TP=1, TP=2 and PP=2, exact
resume after SIGTERM (in-process at PP=2 in fp32, and a killed `minitron distill` re-run in bf16),
and clear errors for a tokenizer mismatch or misplaced layer pairs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from nemo_minitron.distill.model import LayerPair, _check_pair, check_same_tokenizer
from nemo_minitron.models import bridge
from shared import copy_tiny_teacher
from tiny import SENTENCES, global_weights, hf_model, keep_layers, tiny_arch, tiny_tokenizer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
STEPS = 4
# Student layer 0 <-> teacher layer 1 live on pipeline stage 0 at PP=2, 1 <-> 3 on stage 1: the
# first pair's loss travels to the last stage inside the pipeline tensor.
PAIRS = (LayerPair(0, 1), LayerPair(1, 3))


def _models():
    teacher_arch = tiny_arch(tie=True)
    teacher = bridge.hf_to_global(teacher_arch, hf_model(teacher_arch, seed=0).state_dict())
    # Sharper teacher distributions, so the KL is far from zero.
    teacher["decoder.final_layernorm.weight"] = teacher["decoder.final_layernorm.weight"] * 5
    student_arch = tiny_arch(tie=True, num_layers=2, hidden_size=48, ffn_hidden_size=64)
    student = bridge.hf_to_global(student_arch, hf_model(student_arch, seed=1).state_dict())
    return teacher_arch, teacher, student_arch, student


def _stream() -> torch.Tensor:
    ids = tiny_tokenizer()(" ".join(SENTENCES * 8), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def _trainer(out: str, loss_wrapper=None, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
    from nemo_minitron.distill import DistillationLoss, DistillationModel, LogitLoss
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.train import OptimConfig, TokenWindows, TrainConfig, Trainer, TrainingData

    teacher_arch, teacher_sd, student_arch, student_sd = _models()
    teacher, student = (build_gpt_model(arch, dtype, sequence_parallel=sequence_parallel)
                        for arch in (teacher_arch, student_arch))
    bridge.load_global(teacher, teacher_sd)
    bridge.load_global(student, student_sd)
    loss = DistillationLoss(LogitLoss("fwd_kl", lm_weight=0.2))
    data = TrainingData(TokenWindows(_stream(), 16, seed=0), TokenWindows(_stream()[7:], 16, seed=1))
    return Trainer(
        DistillationModel(student, teacher, PAIRS), loss_wrapper(loss) if loss_wrapper else loss, data,
        TrainConfig(steps=STEPS, global_batch_size=4, seq_length=16, micro_batch_size=1, eval_batches=1),
        OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1), out, export_model=student,
    )


def distill_run(out: str, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
    trainer = _trainer(out, dtype=dtype, sequence_parallel=sequence_parallel)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return metrics, trainer.validate(), bridge.gather_global(trainer.export_model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    [result] = run_distributed(distill_run, world_size=1, args=(str(tmp_path_factory.mktemp("tp1")),))
    return result


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,sequence_parallel", [(2, 1, False), (1, 2, False), (2, 1, True), (2, 2, True)])
def test_loss_curve_and_weights_match_tp1(reference, tmp_path, tp, pp, sequence_parallel):
    """With sequence parallelism (the training stages' way at tp > 1) each TP rank pairs its half of
    the tokens' hidden states, and the stages carry sequence shards."""
    ref_metrics, ref_valid, ref_weights = reference
    # training moves: the student's hidden states turn towards the teacher's
    assert ref_metrics[-1]["train/intermediate_loss"] < 0.85 * ref_metrics[0]["train/intermediate_loss"]
    assert ref_metrics[0]["train/kd_loss"] > 0.1
    results = run_distributed(distill_run, world_size=tp * pp, tp=tp, pp=pp,
                              args=(str(tmp_path), torch.float32, sequence_parallel))
    for metrics, valid, weights in results:
        for ours, ref in zip(metrics, ref_metrics):
            for key in ("train/loss", "train/kd_loss", "train/lm_loss", "train/intermediate_loss", "train/grad_norm"):
                assert ours[key] == pytest.approx(ref[key], rel=1e-4), key
        assert valid == pytest.approx(ref_valid, rel=1e-4)
        for name, tensor in ref_weights.items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-4,
                                       msg=lambda m, name=name: f"{name}: {m}")


# bf16 keeps 8 significant bits (relative rounding 2^-9) of every weight and activation; over these
# STEPS the losses stay within 0.5% of fp32 and the gradient norm within 3% (measured at TP=1, TP=2
# and PP=2), so these bounds hold with room and still catch a wrong reduction or a lost update.
BF16_LOSS_RTOL, BF16_GRAD_NORM_RTOL = 1e-2, 5e-2


def bf16_distill_run(out: str):
    """`distill_run` in bf16, plus the dtypes the mixed-precision optimizer holds on this rank."""
    trainer = _trainer(out, dtype=torch.bfloat16)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    trained = [p for p in trainer.module.parameters() if p.requires_grad]
    [optimizer] = trainer.optimizer.chained_optimizers
    return metrics, trainer.validate(), {
        "weights": {str(p.dtype) for p in trainer.module.parameters()},
        "main": {str(p.dtype) for group in optimizer.optimizer.param_groups for p in group["params"]},
        # the weights are the fp32 main weights rounded, after every step
        "rounded": all(torch.equal(p, p.main_param.to(p.dtype)) for p in trained),
    }


@pytest.mark.parametrize("tp,pp", [(1, 1), pytest.param(2, 1, marks=pytest.mark.slow), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_bf16_tracks_fp32_with_fp32_main_weights(reference, tmp_path, tp, pp):
    ref_metrics, ref_valid, _ = reference
    results = run_distributed(bf16_distill_run, world_size=tp * pp, tp=tp, pp=pp, args=(str(tmp_path),))
    for metrics, valid, dtypes in results:
        for ours, ref in zip(metrics, ref_metrics):
            for key in ("train/loss", "train/kd_loss", "train/lm_loss", "train/intermediate_loss"):
                assert ours[key] == pytest.approx(ref[key], rel=BF16_LOSS_RTOL), key
            assert ours["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=BF16_GRAD_NORM_RTOL)
        assert valid == pytest.approx(ref_valid, rel=BF16_LOSS_RTOL)
        assert metrics[-1]["train/intermediate_loss"] < 0.85 * metrics[0]["train/intermediate_loss"]
        # teacher, student (norms included) and projections in bf16; Adam steps fp32 copies of them
        assert dtypes == {"weights": {"torch.bfloat16"}, "main": {"torch.float32"}, "rounded": True}


class _SigtermDuringStep:
    """Wraps the loss: the last pipeline stage sends itself SIGTERM during step 2 (as Slurm would,
    to one rank); the loop must agree across ranks, checkpoint after that step and stop."""

    def __init__(self, loss):
        self.loss, self.trainer, self.sent = loss, None, False

    def __call__(self, output, batch):
        if self.trainer.step == 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return self.loss(output, batch)


def interrupted_then_resumed(out: str, reference_out: str):
    wrapper = None

    def wrap(loss):
        nonlocal wrapper
        wrapper = _SigtermDuringStep(loss)
        return wrapper

    first = _trainer(out, wrap)
    wrapper.trainer = first
    stopped = first.fit()
    resumed = _trainer(out)  # a fresh process state would be the same: new model from the initial weights
    finished = resumed.fit()
    uninterrupted = _trainer(reference_out)
    expected = uninterrupted.fit()
    return (stopped, finished, expected,
            bridge.gather_global(resumed.export_model), bridge.gather_global(uninterrupted.export_model),
            {k: v.detach().clone() for k, v in resumed.extra.items()},
            {k: v.detach().clone() for k, v in uninterrupted.extra.items()})


@pytest.mark.slow
def test_sigterm_checkpoint_and_resume_are_bitwise_exact_at_pp2(tmp_path):
    results = run_distributed(interrupted_then_resumed, world_size=2, pp=2,
                              args=(str(tmp_path / "run"), str(tmp_path / "reference")))
    for stopped, finished, expected, weights, ref_weights, extra, ref_extra in results:
        assert stopped["interrupted"] and stopped["step"] == 2 and "checkpoint" not in stopped
        assert not finished["interrupted"] and finished["step"] == STEPS
        assert finished["train"]["train/loss"] == expected["train"]["train/loss"]
        assert finished["valid"] == expected["valid"]
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
        assert extra.keys() == ref_extra.keys() and all(torch.equal(extra[k], ref_extra[k]) for k in extra)
    assert {len(extra) for *_, extra, _ in results} == {1}  # one projection per stage (48 -> 64 wide)
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model" / "weights").is_dir()


# --- the command: kill, re-run, compare ------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_teacher_source) -> Path:
    return distill_inputs_in(tmp_path_factory.mktemp("distill_cli"), tiny_teacher_source)


def distill_inputs_in(root: Path, tiny_teacher_source: Path) -> Path:
    """`root` with a tiny teacher checkpoint, a student made from it by depth pruning (layers 0 and
    3) and train/valid JSONL."""
    copy_tiny_teacher(tiny_teacher_source, root)
    run_distributed(depth_prune, world_size=1, args=(str(root / "teacher"), str(root / "student"), [0, 3]))
    docs = [" ".join(SENTENCES[i % 4:] + SENTENCES[: i % 4]) * 3 for i in range(40)]
    for name, part in (("train", docs[:32]), ("valid", docs[32:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return root


def depth_prune(teacher: str, student: str, keep: list[int]) -> None:
    """A student checkpoint with the teacher's layers `keep` (needs no pruning package)."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models.gpt import arch_of, build_gpt_model

    source = checkpoint.load_checkpoint(teacher)
    model = build_gpt_model(arch_of(source).replace(num_layers=len(keep)))
    bridge.load_global(model, keep_layers(bridge.gather_global(source), keep))
    checkpoint.save_checkpoint(model, student, checkpoint.load_tokenizer(teacher), {"stage": "depth-prune"})


def _distill_command(root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "nemo_minitron.cli.main", "distill", f"teacher={root / 'teacher'}",
            f"student={root / 'student'}", f"output_dir={out}", f"data.train={root / 'train.jsonl'}",
            f"data.valid={root / 'valid.jsonl'}", f"data.cache_dir={root / 'cache'}", "train.steps=30",
            "train.global_batch_size=4", "train.seq_length=32", "train.log_interval=1", "train.progress_bar=false",
            "optim.warmup_steps=2", "loss.intermediate=[1:3]", "loss.kind=jsd", "dtype=bfloat16"]


@pytest.mark.slow
def test_stopped_distill_command_resumes_to_identical_weights(checkpoints, tmp_path):
    """A pre-emption signal (SIGTERM) and Ctrl-C (SIGINT) each stop `minitron distill` at a checkpoint
    after the step it is in, without a traceback, exiting 75 and 130; re-run, each resumes to the
    weights of an uninterrupted run, and resuming with other settings is refused naming the key."""
    uninterrupted = subprocess.run(_distill_command(checkpoints, tmp_path / "whole"), capture_output=True, text=True,
                                   env=ENV, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    expected = json.loads(uninterrupted.stdout.strip().splitlines()[-1])
    for sig, code in ((signal.SIGTERM, 75), (signal.SIGINT, 130)):
        command = _distill_command(checkpoints, tmp_path / sig.name)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for line in proc.stderr:
            if "step 3:" in line:
                proc.send_signal(sig)
                break
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == code, stderr[-3000:]  # 75 EX_TEMPFAIL (a launcher requeues it), 130 Ctrl-C
        assert "Traceback" not in stderr
        stopped = json.loads(stdout.strip().splitlines()[-1])
        assert stopped["interrupted"] and 3 <= stopped["step"] < 30
        if sig == signal.SIGTERM:
            other = subprocess.run(command + ["optim.lr=5e-4"], capture_output=True, text=True, env=ENV, timeout=300)
            assert other.returncode == 2 and "optim.lr: 0.0001 -> 0.0005" in other.stderr.splitlines()[-1]
        resumed = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"(step {stopped['step']})" in resumed.stderr
        finished = json.loads(resumed.stdout.strip().splitlines()[-1])
        assert finished["step"] == expected["step"] == 30 and finished["valid"] == expected["valid"]
        [(ours, ref)] = run_distributed(global_weights, world_size=1,
                                        args=(str(tmp_path / sig.name / "final"), str(tmp_path / "whole" / "final")))
        assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours), sig.name


def test_tokenizer_mismatch_is_a_clear_error():
    check_same_tokenizer(tiny_tokenizer(320), tiny_tokenizer(320))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(tiny_tokenizer(320), tiny_tokenizer(300))


def test_layer_pairs_must_exist_and_share_a_stage():
    _check_pair(LayerPair(1, 3), student_layers=2, teacher_layers=4, pp=2)
    with pytest.raises(ValueError, match="out of range"):
        _check_pair(LayerPair(2, 3), student_layers=2, teacher_layers=4, pp=1)
    with pytest.raises(ValueError, match="stage 0 but teacher layer 3 on stage 1"):
        _check_pair(LayerPair(0, 3), student_layers=2, teacher_layers=4, pp=2)
