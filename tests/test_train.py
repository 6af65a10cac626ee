"""The training loop on megatron-core (CPU, gloo): the LR schedule, gradient accumulation over
micro-batches and data parallelism give the same update, bf16 and fp16 mixed precision on CPU, the
teacher-correct command (at its default dtype=auto), and bad settings fail with the key to fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from commands import minitron
from distributed import run_distributed
from nemo_minitron.checkpoint import read_metadata
from nemo_minitron.models import bridge
from nemo_minitron.outputs import MARKER_FILE
from nemo_minitron.stage_config import auto_dtype
from nemo_minitron.train import OptimConfig, TrainConfig
from tiny import SENTENCES, hf_model, tiny_arch, tiny_tokenizer, write_hf_dir

STEPS, WARMUP, LR, MIN_LR = 5, 2, 1e-2, 1e-3


def _stream() -> torch.Tensor:
    tok = tiny_tokenizer()
    ids = tok(" ".join(SENTENCES * 8), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids)


def lm_trainer(arch, global_sd, micro_batch_size: int, tmp: str, dtype: torch.dtype = torch.float32,
               steps: int = STEPS, **cadence):
    from nemo_minitron.models.gpt import build_gpt_model
    from nemo_minitron.train import LMLoss, TokenWindows, Trainer, TrainingData

    model = build_gpt_model(arch, dtype)
    bridge.load_global(model, global_sd)
    data = TrainingData(TokenWindows(_stream(), 16, seed=0), None)
    return Trainer(model, LMLoss(), data,
                   TrainConfig(steps=steps, global_batch_size=4, seq_length=16, micro_batch_size=micro_batch_size,
                               **cadence),
                   OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP, clip_grad=1.0), tmp)


def lm_steps(arch, global_sd, micro_batch_size: int, tmp: str, dtype: torch.dtype = torch.float32):
    """STEPS optimizer steps of the LM loss; per-step metrics and the final global weights."""
    trainer = lm_trainer(arch, global_sd, micro_batch_size, tmp, dtype)
    metrics = [trainer.train_step() for _ in range(STEPS)]
    return metrics, bridge.gather_global(trainer.module)


@pytest.fixture(scope="module")
def tiny():
    arch = tiny_arch(tie=True)
    return arch, bridge.hf_to_global(arch, hf_model(arch).state_dict())


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One process, four micro-batches of one sample per step."""
    arch, sd = tiny
    [result] = run_distributed(lm_steps, world_size=1, args=(arch, sd, 1, str(tmp_path_factory.mktemp("ref"))))
    return result


def test_lr_warms_up_then_decays_to_min_lr_with_cosine(reference):
    metrics, _ = reference
    lrs = [m["train/lr"] for m in metrics]
    expected = [LR * k / WARMUP if k <= WARMUP else
                MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (k - WARMUP) / (STEPS - WARMUP)))
                for k in range(1, STEPS + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[-1] == pytest.approx(MIN_LR)
    losses = [m["train/loss"] for m in metrics]
    assert losses[-1] < losses[0] - 0.5  # the model learns the repeated sentences
    assert all(0 < m["train/grad_norm"] for m in metrics) and all(m["train/tokens_per_s"] > 0 for m in metrics)


def test_an_unset_warm_up_is_a_tenth_of_the_run():
    from nemo_minitron.train.optim import build_scheduler

    def rates(warmup_steps: int | None) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        scheduler = build_scheduler(optimizer, OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=warmup_steps), 40)
        out = []
        for _ in range(40):
            scheduler.step(1)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    assert OptimConfig(warmup_steps=None).warmup_for(40) == 4
    assert rates(None) == rates(4) and rates(None)[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_a_trainer_refuses_to_resume_other_settings_as_a_stage_does(tmp_path):
    from nemo_minitron import UserError, parallel
    from nemo_minitron.train import state

    step = tmp_path / "run" / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / state.TRAINER_FILE).write_text(json.dumps({"layout": {"tp": 1, "pp": 1, "dp": 1},
                                                       "signature": {"optim.lr": 0.001, "train.seq_length": 64}}))
    layout = parallel.ParallelLayout(world_size=1, rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0)
    with pytest.raises(UserError) as err:
        state.check_resumable(step, layout, {"optim.lr": 0.0003, "train.seq_length": 64, "loss.kind": "fwd_kl"})
    assert str(err.value) == (f"output_dir={tmp_path / 'run'} holds a training run made with other settings "
                              f"(loss.kind: '<unset>' -> 'fwd_kl'; optim.lr: 0.001 -> 0.0003): repeat those settings, "
                              f"or choose another output_dir")


def fit_keeping_models(arch, global_sd, tmp: str):
    """A checkpoint after every step, the two newest whole and the older ones as their model; then
    the step-1 model loaded, and the weights of a fresh run after one step."""
    from nemo_minitron import checkpoint
    from nemo_minitron.train import state

    run = Path(tmp) / "run"
    lm_trainer(arch, global_sd, 4, str(run), save_interval=1, keep_checkpoints=2, keep_models=True).fit()
    contents = {p.name: sorted(q.name for q in p.iterdir()) for p in (run / state.CHECKPOINTS_DIR).iterdir()}
    complete = [p.name for p in state.complete_checkpoints(run)]
    saved = bridge.gather_global(checkpoint.load_checkpoint(state.step_dir(run, 1) / state.MODEL_DIR))
    one_step = lm_trainer(arch, global_sd, 4, f"{tmp}/one")
    one_step.train_step()
    return contents, complete, saved, bridge.gather_global(one_step.module)


def test_keep_models_keeps_each_older_checkpoints_model_and_the_newest_two_whole(tiny, tmp_path):
    [(contents, complete, saved, one_step)] = run_distributed(fit_keeping_models, world_size=1,
                                                              args=(*tiny, str(tmp_path)))
    whole = ["model", "train_state", "trainer.json"]
    # steps 1..4 saved (the last step writes final/ instead); two whole, the older two their model alone
    assert contents == {"step_0000001": ["model"], "step_0000002": ["model"], "step_0000003": whole,
                        "step_0000004": whole}
    assert complete == ["step_0000003", "step_0000004"]  # what a resumed run may start from
    assert saved.keys() == one_step.keys()
    for name in saved:
        torch.testing.assert_close(saved[name], one_step[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("world,micro_batch_size", [(1, 4), pytest.param(2, 1, marks=pytest.mark.slow)],
                         ids=["one-micro-batch", "dp2"])
def test_accumulation_and_data_parallel_give_the_same_steps(tiny, reference, tmp_path, world, micro_batch_size):
    arch, sd = tiny
    ref_metrics, ref_weights = reference
    metrics, weights = run_distributed(lm_steps, world_size=world, args=(arch, sd, micro_batch_size, str(tmp_path)))[0]
    for ours, ref in zip(metrics, ref_metrics):
        assert ours["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5)
        assert ours["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4)
    # The loss and gradient norm pin the accumulated gradient (Adam's update is scale-invariant);
    # the weights agree to a small fraction of one update (lr 1e-2).
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_bf16_lm_training_tracks_fp32_and_learns(tiny, reference, tmp_path):
    """bf16 weights and activations, fp32 gradients and main weights (on CPU through cpu_shims):
    per-step losses within 1% of fp32 (bf16 rounds to 2^-9 relative; measured: within 0.1%)."""
    arch, sd = tiny
    ref_metrics, _ = reference
    [(metrics, weights)] = run_distributed(lm_steps, world_size=1, args=(arch, sd, 1, str(tmp_path), torch.bfloat16))
    losses = [m["train/loss"] for m in metrics]
    assert losses == pytest.approx([m["train/loss"] for m in ref_metrics], rel=1e-2)
    assert losses[-1] < losses[0] - 0.5
    assert [m["train/lr"] for m in metrics] == [m["train/lr"] for m in ref_metrics]
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # norms too, as megatron's Float16Module casts


def fp16_steps(arch, global_sd, tmp: str) -> list[tuple[float, float, bool]]:
    """40 fp16 LM steps: (loss, loss scale after the step, whether the weights were updated)."""
    trainer = lm_trainer(arch, global_sd, 4, tmp, torch.float16, steps=40)
    steps = []
    for _ in range(40):
        metrics = trainer.train_step()
        steps.append((metrics["train/loss"], float(trainer.optimizer.get_loss_scale()), "train/grad_norm" in metrics))
    return steps


def test_fp16_dynamic_loss_scale_backs_off_then_trains_on_cpu(tiny, tmp_path):
    """fp16 runs megatron's dynamic loss scaler, on CPU too: from 2^32 the scaled gradients overflow,
    the step is skipped and the scale halved, until they fit in fp16; then every step updates."""
    arch, sd = tiny
    [steps] = run_distributed(fp16_steps, world_size=1, args=(arch, sd, str(tmp_path)))
    losses, scales, updated = zip(*steps)
    assert scales[:3] == (2.0**32, 2.0**31, 2.0**30) and not any(updated[:3])
    assert all(updated[-10:]) and len(set(scales[-10:])) == 1
    assert losses[-1] < losses[0] - 1.0


def test_bad_batch_geometry_names_the_key():
    with pytest.raises(ValueError, match="train.global_batch_size"):
        TrainConfig(steps=2, global_batch_size=6, seq_length=8, micro_batch_size=4).validate(dp=1)
    with pytest.raises(ValueError, match="train.global_batch_size"):
        TrainConfig(steps=2, global_batch_size=6, seq_length=8).validate(dp=4)
    with pytest.raises(ValueError, match="optim.warmup_steps"):
        OptimConfig(warmup_steps=5).validate(steps=5)
    with pytest.raises(ValueError, match="optim.min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3).validate(steps=5)


# --- teacher correction: the same loop, LM loss, through the CLI ---------------------------------

@pytest.mark.slow
def test_teacher_correct_command(tmp_path):
    write_hf_dir(tmp_path / "hf", tiny_arch(tie=True))
    docs = [" ".join(SENTENCES[i % 4:] + SENTENCES[: i % 4]) * 3 for i in range(12)]
    for name, part in (("train", docs[:10]), ("valid", docs[10:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    minitron("import", f"hf_path={tmp_path / 'hf'}", f"output_dir={tmp_path / 'teacher'}")
    common = [f"teacher={tmp_path / 'teacher'}", f"output_dir={tmp_path / 'corrected'}",
              f"data.train={tmp_path / 'train.jsonl'}", f"data.valid={tmp_path / 'valid.jsonl'}",
              f"data.cache_dir={tmp_path / 'cache'}", "train.global_batch_size=2", "train.seq_length=32"]
    # docs/design.md section 10's 120 warmup steps are the default: a shorter run must say which key to change.
    bad = minitron("teacher-correct", *common, "train.steps=4", check=False)
    assert bad.returncode == 2 and "optim.warmup_steps=120" in bad.stderr
    result = json.loads(minitron("teacher-correct", *common, "train.steps=4", "optim.warmup_steps=1",
                                 "original_peak_lr=5e-3").stdout.strip().splitlines()[-1])
    assert result["step"] == 4 and result["tokens"] == 4 * 2 * 32 and not result["interrupted"]
    assert math.isfinite(result["val_perplexity"]) and result["val_perplexity"] > 1
    lrs = [json.loads(line)["train/lr"] for line in (tmp_path / "corrected" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(5e-3 / 5) and lrs[-1] == pytest.approx(5e-3 / 5 / 10)  # 1/5 of the peak, to 1/10
    assert (tmp_path / "corrected" / "tensorboard").is_dir()
    # dtype=auto (the training stages' default) is resolved once: the settings the run recorded and the
    # checkpoint it wrote name the dtype that ran (bfloat16 where the CPU computes it natively)
    marker = json.loads((tmp_path / "corrected" / MARKER_FILE).read_text())
    assert marker["settings"]["dtype"] == auto_dtype() == read_metadata(tmp_path / "corrected" / "final")["dtype"]
    # the corrected teacher is a complete checkpoint that the other stages read
    evaluated = json.loads(minitron("eval", f"checkpoint={tmp_path / 'corrected' / 'final'}",
                                    f"data={tmp_path / 'valid.jsonl'}", "seq_len=16").stdout.strip().splitlines()[-1])
    assert math.isfinite(evaluated["perplexity"]) and evaluated["dtype"] == "float32"  # eval's default
    in_bf16 = json.loads(minitron("eval", f"checkpoint={tmp_path / 'corrected' / 'final'}",
                                  f"data={tmp_path / 'valid.jsonl'}", "seq_len=16", "dtype=bfloat16").stdout.strip()
                         .splitlines()[-1])
    assert in_bf16["dtype"] == "bfloat16" and in_bf16["perplexity"] == pytest.approx(evaluated["perplexity"], rel=1e-2)
    again = json.loads(minitron("teacher-correct", *common, "train.steps=4", "optim.warmup_steps=1",
                                "original_peak_lr=5e-3").stdout.strip().splitlines()[-1])
    assert again["already_complete"] and again["step"] == 4

    # a diverging run stops at the first non-finite loss or gradient norm: exit 3, no final/
    diverging = [*common[:1], f"output_dir={tmp_path / 'diverged'}", *common[2:], "train.steps=6",
                 "optim.warmup_steps=0", "optim.lr=1e9", "optim.min_lr=1e9", "optim.decay_style=constant",
                 "train.save_interval=1", "train.keep_checkpoints=10"]
    proc = minitron("teacher-correct", *diverging, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    step = int(message.split("training diverged at step ")[1].split(" ")[0])
    assert message.startswith("error: training diverged at step ") and 1 <= step <= 6
    assert not (tmp_path / "diverged" / "final").exists()
    saved = sorted(p.name for p in (tmp_path / "diverged" / "checkpoints").iterdir())
    assert saved == [f"step_{s:07d}" for s in range(1, step)]  # only steps before the divergence
    rows = [json.loads(line) for line in (tmp_path / "diverged" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == step and not all(math.isfinite(rows[-1][k]) for k in ("train/loss", "train/grad_norm"))


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_aborts():
    """SIGINT is recorded like a pre-emption signal (the loop checkpoints after the step; exit 130,
    not the requeue code 75); a second Ctrl-C raises KeyboardInterrupt at once; handlers are restored."""
    import os
    import signal

    from nemo_minitron.train import signals

    before = signal.getsignal(signal.SIGINT)
    with signals.PreemptionHandler() as handler:
        assert not handler.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested() and signals.exit_code() == 75
        os.kill(os.getpid(), signal.SIGINT)
        assert handler.received == signal.SIGINT and signals.exit_code() == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
