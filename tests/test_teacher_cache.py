"""The offline teacher (`minitron teacher-logits`, `distill teacher_cache=`): the cache reproduces the
teacher's top-k logits exactly, whatever TP / PP / DP wrote it; an interrupted write resumes to the
same files; distillation from the cache follows the online top-k distillation step for step and
at TP=2 equals TP=1; misuse fails before any work, naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import run_distributed
from tiny import hf_model, keep_layers, tiny_arch, tiny_tokenizer, write_sentence_docs

K = 16
STEPS, BATCH, SEQ = 5, 4, 24
TRAIN = dict(steps=STEPS, global_batch_size=BATCH, seq_length=SEQ, eval_batches=1)


def _make_checkpoints(root: str) -> None:
    """A tiny teacher (sharpened, so the KL is far from zero), a student of its layers 0 and 3, and
    train / held-out documents."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model

    arch = tiny_arch(tie=True)
    teacher_sd = bridge.hf_to_global(arch, hf_model(arch, seed=0).state_dict())
    teacher_sd["decoder.final_layernorm.weight"] = teacher_sd["decoder.final_layernorm.weight"] * 5
    tokenizer = tiny_tokenizer(arch.vocab_size)
    for name, model_arch, sd in (("teacher", arch, teacher_sd),
                                 ("student", arch.replace(num_layers=2), keep_layers(teacher_sd, [0, 3]))):
        model = build_gpt_model(model_arch)
        bridge.load_global(model, sd)
        checkpoint.save_checkpoint(model, Path(root) / name, tokenizer, {"stage": "import"})
    write_sentence_docs(Path(root) / "train.jsonl", 32)
    write_sentence_docs(Path(root) / "valid.jsonl", 6)


def _data(root: Path) -> dict:
    return {"train": str(root / "train.jsonl"), "valid": str(root / "valid.jsonl"), "cache_dir": str(root / "data")}


def write_cache(root: str, out: str, fail_after: int | None = None, how: str = "crash",
                file_bytes: int | None = None, held_out: bool = True, train: dict | None = None) -> dict:
    """`minitron teacher-logits` in this process; with `fail_after`, after that many micro-batches
    the teacher's top-k fails (`crash`) or the process gets SIGTERM (`sigterm`, as from Slurm);
    `file_bytes` caps the cache's files (1: one global batch per file); `held_out=False` leaves
    `data.valid` unset; `train` changes train.* keys."""
    import functools
    import os
    import signal

    from nemo_minitron.distill import stage, teacher_cache
    from nemo_minitron.train.config import DataConfig, TrainConfig

    originals = {"write_teacher_cache": teacher_cache.write_teacher_cache, "teacher_top_k": teacher_cache.teacher_top_k}
    if file_bytes is not None:
        teacher_cache.write_teacher_cache = functools.partial(teacher_cache.write_teacher_cache, file_bytes=file_bytes)

    if fail_after is not None:
        real, calls = teacher_cache.teacher_top_k, []

        def failing(logits, k):
            calls.append(1)
            if len(calls) == fail_after + 1 and how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif len(calls) > fail_after and how == "crash":
                raise RuntimeError("node failure")
            return real(logits, k)

        teacher_cache.teacher_top_k = failing
    cfg = stage.TeacherLogitsConfig(teacher=str(Path(root) / "teacher"), output_dir=out, top_k=K, dtype="float32",
                                    data=DataConfig(**_data(Path(root)) | ({} if held_out else {"valid": None})),
                                    train=TrainConfig(**TRAIN | (train or {}), progress_bar=False))
    from megatron.core import parallel_state as ps

    cfg.tp, cfg.pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    try:
        return stage.cache_teacher_logits(cfg)
    except RuntimeError as err:
        return {"failed": str(err)}
    finally:  # a world of one runs in the test's process (distributed.py): leave the module as found
        for name, value in originals.items():
            setattr(teacher_cache, name, value)


def read_cache(out: str) -> dict[str, list[dict[str, torch.Tensor]]]:
    from nemo_minitron.distill.teacher_cache import TeacherCache

    cache = TeacherCache(out)
    return {split: [cache.samples(split)[i] for i in range(len(cache.samples(split)))] for split in ("train", "valid")}


def teacher_logits(root: str, tokens: torch.Tensor) -> torch.Tensor:
    """The teacher's full logits on `tokens` [n, s], straight from its checkpoint."""
    from nemo_minitron import checkpoint
    from nemo_minitron.models.runner import forward_microbatches

    model = checkpoint.load_checkpoint(Path(root) / "teacher")
    [logits] = forward_microbatches(model, [{"tokens": tokens}], lambda logits, _: logits)
    return logits


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher_cache")
    run_distributed(_make_checkpoints, world_size=1, args=(str(root),))
    [result] = run_distributed(write_cache, world_size=1, args=(str(root), str(root / "cache")))
    assert result["samples"] == {"train": STEPS * BATCH, "valid": BATCH}
    assert result["bytes_per_token"] == K * 8 + 17
    return root


def test_cache_round_trip_reproduces_the_teachers_top_k_exactly(root):
    [samples] = run_distributed(read_cache, world_size=1, args=(str(root / "cache"),))
    train = samples["train"]
    tokens = torch.stack([s["tokens"] for s in train])
    [logits] = run_distributed(teacher_logits, world_size=1, args=(str(root), tokens))
    top = logits.topk(K, dim=-1)
    assert torch.equal(torch.stack([s["teacher_values"] for s in train]), top.values)
    assert torch.equal(torch.stack([s["teacher_indices"] for s in train]), top.indices)
    log_z = torch.logsumexp(logits, dim=-1)
    torch.testing.assert_close(torch.stack([s["teacher_log_partition"] for s in train]), log_z)
    tail = 1 - torch.softmax(logits, -1).gather(-1, top.indices).sum(-1)
    torch.testing.assert_close(torch.stack([s["teacher_log_tail"] for s in train]).exp(), tail, rtol=1e-4, atol=1e-6)
    assert tail.min() > 1e-3  # a real tail: the test would see a lost one
    # the samples are the labelled windows distill draws: labels are the next tokens
    assert all(torch.equal(s["labels"][:-1], s["tokens"][1:]) for s in train)
    assert all(s["loss_mask"].sum() == SEQ for s in train)


@pytest.mark.slow
def test_any_layout_writes_the_same_cache(root, tmp_path):
    [reference] = run_distributed(read_cache, world_size=1, args=(str(root / "cache"),))
    # TP=2 x PP=2; and two data-parallel writers with one global batch per file
    for world, tp, pp, file_bytes in ((4, 2, 2, None), (2, 1, 1, 1)):
        out = tmp_path / f"tp{tp}pp{pp}dp{world // tp // pp}"
        run_distributed(write_cache, world_size=world, tp=tp, pp=pp, args=(str(root), str(out), None, "", file_bytes))
        [samples] = run_distributed(read_cache, world_size=1, args=(str(out),))
        for split in ("train", "valid"):
            for ours, ref in zip(samples[split], reference[split], strict=True):
                assert torch.equal(ours["tokens"], ref["tokens"]) and torch.equal(ours["teacher_indices"],
                                                                                   ref["teacher_indices"])
                for key in ("teacher_values", "teacher_log_partition", "teacher_log_tail"):
                    torch.testing.assert_close(ours[key], ref[key], rtol=1e-5, atol=1e-5)
    files = sorted(p.name for p in (tmp_path / "tp1pp1dp2" / "train").iterdir())
    assert files == [f"w{w:05d}-f{f:05d}" for w in range(2) for f in range(STEPS)]


def test_interrupted_write_resumes_to_identical_files(root, tmp_path):
    out = tmp_path / "cache"
    [failed] = run_distributed(write_cache, world_size=1, args=(str(root), str(out), 3 * BATCH + 2))
    assert failed == {"failed": "node failure"}
    # valid (1 batch) and 2 training batches finished before the crash
    assert json.loads((out / "progress.json").read_text()) == {"valid": 1, "train": 2}
    run_distributed(read_cache_fails, world_size=1, args=(str(out), "incomplete (train: 2 of 5 global batches)"))
    [resumed] = run_distributed(write_cache, world_size=1, args=(str(root), str(out)))
    assert resumed["tokens_written"] == 3 * BATCH * SEQ  # only what was missing
    for path in sorted((root / "cache").rglob("*.npy")):
        ours = np.load(out / path.relative_to(root / "cache"))
        assert np.array_equal(ours, np.load(path)), path
    [again] = run_distributed(write_cache, world_size=1, args=(str(root), str(out)))
    assert again["already_complete"] and again["tokens_written"] == 0


def test_a_re_run_compares_only_the_train_keys_that_decide_the_samples(root, tmp_path):
    """Of train.*, a cache records `TrainConfig.SAMPLE_KEYS` only: a re-run with another micro-batch
    or log interval finds it complete, as does one over a cache written while train.* was a copy of
    six TrainConfig keys (which also recorded train.micro_batch_size); another sample key is refused,
    naming it, before any work."""
    import shutil

    from nemo_minitron.outputs import MARKER_FILE
    from nemo_minitron.train.config import TrainConfig

    out = tmp_path / "cache"
    shutil.copytree(root / "cache", out)
    marker = out / MARKER_FILE
    record = json.loads(marker.read_text())
    assert sorted(k for k in record["settings"] if k.startswith("train.")) == sorted(
        f"train.{k}" for k in TrainConfig.SAMPLE_KEYS)
    record["settings"]["train.micro_batch_size"] = 1  # as the copy recorded it
    marker.write_text(json.dumps(record))
    for train in (None, {"micro_batch_size": 2, "log_interval": 3}):
        [again] = run_distributed(write_cache, world_size=1, args=(str(root), str(out), None, "crash", None, True,
                                                                   train))
        assert again["already_complete"] and again["tokens_written"] == 0, train
    with pytest.raises(RuntimeError, match=r"UserError: .* made with other settings \(train.steps: 5 -> 6\)"):
        run_distributed(write_cache, world_size=1, args=(str(root), str(out), None, "crash", None, True,
                                                         {"steps": 6}))


@pytest.mark.slow
def test_sigterm_stops_after_a_finished_batch(root, tmp_path):
    out = tmp_path / "cache"
    [stopped] = run_distributed(write_cache, world_size=1, args=(str(root), str(out), BATCH + 1, "sigterm"), spawn=True)
    # the signal arrives in the first training batch, which still finishes
    assert stopped["interrupted"] and stopped["tokens_written"] == 2 * BATCH * SEQ
    assert json.loads((out / "progress.json").read_text()) == {"valid": 1, "train": 1}
    [resumed] = run_distributed(write_cache, world_size=1, args=(str(root), str(out)))
    assert not resumed["interrupted"] and resumed["tokens_written"] == (STEPS - 1) * BATCH * SEQ


def read_cache_fails(out: str, message: str) -> None:
    from nemo_minitron.distill.teacher_cache import TeacherCache
    from nemo_minitron.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TeacherCache(out)


def distill(root: str, out: str, source: str, loss: dict) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """`minitron distill` in this process from `source` (teacher | teacher_cache) in fp32: its
    per-step metrics and the trained student's weights."""
    from megatron.core import parallel_state as ps

    from nemo_minitron import checkpoint
    from nemo_minitron.distill.stage import DistillConfig, LossConfig, distill_checkpoint
    from nemo_minitron.models import bridge
    from nemo_minitron.train.config import DataConfig, OptimConfig, TrainConfig

    base = Path(root)
    cfg = DistillConfig(student=str(base / "student"), output_dir=out, dtype="float32",
                        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                        data=DataConfig(**_data(base)) if source == "teacher" else DataConfig(cache_dir=str(base / "data")),
                        train=TrainConfig(**TRAIN, progress_bar=False), loss=LossConfig(**loss),
                        optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1))
    setattr(cfg, source, str(base / ("teacher" if source == "teacher" else "cache")))
    distill_checkpoint(cfg)
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return metrics, bridge.gather_global(checkpoint.load_checkpoint(Path(out) / "final"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fwd_kl", "topk_kl"])
def test_distilling_from_the_cache_equals_online_top_k_at_tp1_and_tp2(root, tmp_path, kind):
    loss = dict(kind=kind, top_k=K, lm_weight=0.3)
    [(online, online_weights)] = run_distributed(distill, world_size=1,
                                                 args=(str(root), str(tmp_path / "online"), "teacher", loss))
    assert min(m["train/kd_loss"] for m in online) > 0.1  # far from zero: a lost term would show
    for tp in (1, 2):
        results = run_distributed(distill, world_size=tp, tp=tp,
                                  args=(str(root), str(tmp_path / f"cached{tp}"), "teacher_cache", loss))
        for metrics, weights in results:
            assert len(metrics) == len(online) == STEPS
            for ours, ref in zip(metrics, online):
                for key in ("train/loss", "train/kd_loss", "train/lm_loss", "train/grad_norm"):
                    assert ours[key] == pytest.approx(ref[key], rel=1e-4), (tp, key)
            for key in ("val/kd_loss", "val/lm_loss"):
                assert metrics[-1][key] == pytest.approx(online[-1][key], rel=1e-4), (tp, key)
            for name, tensor in online_weights.items():
                torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-4)


def distill_refuses(root: str, out: str, cases: list[tuple[dict, str]]) -> None:
    """Each case's changes to a valid cached distillation make it fail with its message, before any work."""
    from nemo_minitron.distill.stage import DistillConfig, distill_checkpoint
    from nemo_minitron.errors import UserError
    from nemo_minitron.train.config import TrainConfig

    for changes, message in cases:
        cfg = DistillConfig(student=str(Path(root) / "student"), teacher_cache=str(Path(root) / "cache"),
                            output_dir=out, dtype="float32", train=TrainConfig(**TRAIN))
        for key, value in changes.items():
            target = cfg
            *parents, leaf = key.split(".")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, value)
        with pytest.raises(UserError, match=message):
            distill_checkpoint(cfg)
        assert not Path(out).exists(), changes  # refused before any work


def test_misuse_of_a_cache_is_refused_naming_the_key(root, tmp_path):
    cases = [
        ({"teacher": "runs/teacher"}, "set one of teacher= .* and teacher_cache="),
        ({"train.seq_length": 32}, "train.seq_length=32 differs from the teacher cache's 24"),
        ({"train.steps": 6}, r"train.steps x train.global_batch_size = 24 train samples, but .* holds 20"),
        ({"train.eval_batches": 2}, "8 valid samples, but .* holds 4"),
        ({"loss.top_k": 32}, "loss.top_k=32 exceeds the 16 logits per token"),
        ({"loss.temperature": 2.0}, "needs loss.temperature=1"),
        ({"loss.intermediate": ["0:1"]}, "loss.intermediate compares hidden states"),
        ({"data.train": "other.jsonl"}, "the samples come from the cache; leave data.train unset"),
    ]
    run_distributed(distill_refuses, world_size=1, args=(str(root), str(tmp_path / "out"), cases))


def distill_from_cache(root: str, cache: str, out: str) -> dict:
    from nemo_minitron.distill.stage import DistillConfig, distill_checkpoint
    from nemo_minitron.train.config import OptimConfig, TrainConfig

    return distill_checkpoint(DistillConfig(student=str(Path(root) / "student"), teacher_cache=cache, output_dir=out,
                                            dtype="float32", train=TrainConfig(**TRAIN, progress_bar=False),
                                            optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1)))


def test_a_cache_without_held_out_data_distills_with_the_defaults(root, tmp_path):
    """`teacher-logits` without data.valid writes no held-out split; `distill teacher_cache=` with
    the default train.eval_batches then trains without validation, as `distill teacher=` without
    held-out data does, instead of asking for held-out samples the cache cannot have."""
    [written] = run_distributed(write_cache, world_size=1, args=(str(root), str(tmp_path / "cache"), None, "crash",
                                                                 None, False))
    assert written["samples"] == {"train": STEPS * BATCH}
    [result] = run_distributed(distill_from_cache, world_size=1,
                               args=(str(root), str(tmp_path / "cache"), str(tmp_path / "out")))
    assert result["step"] == STEPS and result["valid"] == {} and (tmp_path / "out" / "final").is_dir()


def test_a_truncated_or_missing_cache_file_is_refused_naming_it(root, tmp_path):
    """Checked when the cache is opened (`distill teacher_cache=` does before any work), not when a
    run reaches the file."""
    import shutil

    from nemo_minitron.distill.teacher_cache import TeacherCache
    from nemo_minitron.errors import UserError

    for damage in ("truncate", "delete"):
        damaged = tmp_path / damage
        shutil.copytree(root / "cache", damaged)
        values = sorted(damaged.rglob("values.npy"))[-1]
        if damage == "truncate":
            values.write_bytes(values.read_bytes()[:-100])
        else:
            values.unlink()
        with pytest.raises(UserError, match=f"{values} is damaged or missing"):
            TeacherCache(damaged)
    TeacherCache(root / "cache")  # the sound one opens
