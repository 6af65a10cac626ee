"""The distillation stages: teacher correction (LM-loss fine-tuning of the teacher on the
distillation data), the offline teacher (its top-k logits over a run's samples, written once), and
knowledge distillation of a student from a frozen teacher on the same ranks or from such a cache
(docs/design.md). All resume when re-run with the same config, and a finished run returns its
result without work."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from nemo_minitron import checkpoint, parallel
from nemo_minitron.distill import teacher_cache
from nemo_minitron.distill.losses import LogitLoss
from nemo_minitron.distill.model import DistillationLoss, DistillationModel, LayerPair, check_same_tokenizer
from nemo_minitron.errors import UserError
from nemo_minitron.outputs import claim_output, content_id, releases_output_locks, settings_of
from nemo_minitron.stage_config import StageConfig, nested
from nemo_minitron.train import LMLoss, Trainer
from nemo_minitron.train import training_stage as train_stage
from nemo_minitron.train.config import DataConfig, OptimConfig, TrainConfig
from nemo_minitron.train.data import TrainingData, tokenizer_fingerprint

log = logging.getLogger("nemo_minitron")


@dataclass
class LossConfig:
    """The distillation objective (see `DistillationLoss` and `LogitLoss`)."""

    kind: str = "fwd_kl"   # fwd_kl | rev_kl | jsd | topk_kl
    temperature: float = 1.0   # softmax temperature of teacher and student logits (the loss is scaled by T^2)
    # topk_kl: renormalised over the teacher's top k (paper: k <= 100 hurts); others: top k + one tail bucket (with
    # teacher_cache, null: the cache's k)
    top_k: int | None = None
    lm_weight: float = 0.0   # objective = logit loss + lm_weight * LM loss (paper: KLD alone is best)
    # hidden-state cosine losses at layer pairs "student:teacher" (0-based), e.g. ["7:15","14:29"]
    intermediate: list[Any] = field(default_factory=list)
    dynamic_balance: bool = True   # weight intermediate losses by alpha = L_logits / L_intermediate
    intermediate_weight: float = 1.0   # fixed weight when dynamic_balance is false
    chunk_tokens: int = 128   # tokens per chunk of the logit loss: bounds its memory (and keeps it in cache)

    def objective(self) -> DistillationLoss:
        return DistillationLoss(LogitLoss(self.kind, self.temperature, self.top_k, self.lm_weight),
                                dynamic_balance=self.dynamic_balance, intermediate_weight=self.intermediate_weight,
                                chunk_tokens=self.chunk_tokens)

    def layer_pairs(self) -> tuple[LayerPair, ...]:
        """`intermediate` entries, each "student:teacher" or [student, teacher]."""
        pairs = []
        for value in self.intermediate:
            parts = str(value).split(":") if isinstance(value, str) else list(value)
            try:
                student, teacher = (int(p) for p in parts)
            except ValueError:
                raise UserError(f"loss.intermediate entry {value!r} is not 'student_layer:teacher_layer'") from None
            pairs.append(LayerPair(student, teacher))
        return tuple(pairs)


@dataclass
class DistillConfig(train_stage.TrainingStageConfig):
    teacher: str | None = None   # the teacher checkpoint (frozen), run beside the student; or set teacher_cache
    # instead of teacher: a `minitron teacher-logits` output (its samples and their teacher top-k logits)
    teacher_cache: str | None = None
    student: str | None = None   # the student checkpoint to train, e.g. a prune output
    # the practice paper's distillation schedule (peak 1e-4, min 1e-5, cosine), fewer warmup steps
    optim: OptimConfig = nested(OptimConfig, warmup_steps=10)
    loss: LossConfig = nested(LossConfig)


@dataclass
class TeacherLogitsConfig(StageConfig):
    """The teacher's top-k logits over the samples a distillation run with the same `data.*`,
    `train.*` and `seed` draws (`train.steps` x `train.global_batch_size` training samples and
    `train.eval_batches` x `train.global_batch_size` held-out ones: `TrainConfig.SAMPLE_KEYS`)."""

    teacher: str | None = None   # the teacher checkpoint
    output_dir: str | None = None   # where the cache goes
    # teacher logits kept per token; bytes per token = top_k x (2 in bf16 or 4 in fp32, + 4 for the id) + 17
    top_k: int = 64
    # the teacher's compute dtype (the stored logits keep it): auto is bfloat16 where the device computes it natively
    dtype: str = "auto"
    data: DataConfig = nested(DataConfig)
    # the distill run's train.* keys: set them as for that run (steps, global_batch_size, seq_length and eval_batches
    # decide the samples cached; micro_batch_size is the teacher's forward batch; the others do not apply)
    train: TrainConfig = nested(TrainConfig)


@dataclass
class TeacherCorrectConfig(train_stage.TrainingStageConfig):
    teacher: str | None = None   # the teacher checkpoint to fine-tune
    original_peak_lr: float = 3.0e-4  # the teacher's pretraining peak LR (3e-4: Llama-3.1-8B); lr defaults to 1/5 of it
    optim: OptimConfig = nested(OptimConfig, lr=None, min_lr=None, warmup_steps=120)

    def with_schedule(self) -> "TeacherCorrectConfig":
        """A copy whose unset `optim.lr` is 1/5 of `original_peak_lr` (the practice paper's) and unset
        `optim.min_lr` a tenth of that."""
        lr = self.optim.lr if self.optim.lr is not None else self.original_peak_lr / 5
        min_lr = self.optim.min_lr if self.optim.min_lr is not None else lr / 10
        return dataclasses.replace(self, optim=dataclasses.replace(self.optim, lr=lr, min_lr=min_lr))


@releases_output_locks
def distill_checkpoint(cfg: DistillConfig) -> dict:
    """Train `cfg.student` on the logits of `cfg.teacher`, or of the teacher cache
    `cfg.teacher_cache`; the student lands in OUTPUT/final."""
    cfg.require("student", "output_dir")
    if (cfg.teacher is None) == (cfg.teacher_cache is None):
        raise UserError("set one of teacher= (a checkpoint, run beside the student) and teacher_cache= (a "
                        "`minitron teacher-logits` output)")
    cache = _open_cache(cfg) if cfg.teacher_cache else None
    loss = cfg.loss.objective()
    pairs = cfg.loss.layer_pairs()
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    teacher_arch = train_stage.checkpoint_arch(cfg, "teacher") if cache is None else None
    student_arch = train_stage.checkpoint_arch(cfg, "student")
    tokenizer = checkpoint.load_tokenizer(cfg.student)
    if cache is None:
        train_stage.check_data(cfg, tokenizer)
    done = train_stage.start_run(cfg, "distill", [cfg.teacher, cfg.teacher_cache, cfg.student, cfg.data.train,
                                                  cfg.data.valid], ["teacher", "student"] if cache is None else ["student"])
    if done is not None:
        return done
    student = train_stage.load_for_training(cfg.student, cfg)
    if cache is None:
        check_same_tokenizer(checkpoint.load_tokenizer(cfg.teacher), tokenizer)
        data = train_stage.training_data(cfg, tokenizer)
        teacher = train_stage.load_for_training(cfg.teacher, cfg)
        model = DistillationModel(student, teacher, pairs, projection_seed=cfg.seed)
        source = f"{cfg.teacher} ({teacher_arch.num_parameters()['total']:,} params)"
    else:
        _check_cache_student(cache, student_arch, tokenizer)
        data = TrainingData(cache.samples("train"), cache.samples("valid") if cfg.train.eval_batches else None)
        if cfg.train.eval_batches and data.valid is None:
            log.info("the teacher cache holds no held-out samples (written without data.valid): no validation")
        model = student
        source = f"the top-{loss.logits.top_k} logits in {cfg.teacher_cache}"
    log.info("distilling %s (%s params) from %s at %s, loss %s", cfg.student,
             f"{student_arch.num_parameters()['total']:,}", source, layout.describe(), loss.logits.kind)
    trainer = Trainer(
        model, loss, data, cfg.train, cfg.optim, cfg.output_dir, export_model=student, tokenizer=tokenizer,
        metadata={"stage": "distill", "teacher": str(cfg.teacher or cfg.teacher_cache), "student": str(cfg.student)},
        signature={**train_stage.signature(cfg, "teacher", "teacher_cache", "student", "loss", "data", "dtype", "seed"),
                   **({"teacher_cache.id": cache.id} if cache else {})},
    )
    return train_stage.result(trainer.fit())


def _open_cache(cfg: DistillConfig) -> teacher_cache.TeacherCache:
    """The teacher cache of a distillation run, checked against the run's settings (before any
    work); fills in `loss.top_k` (default: all the cache holds)."""
    cache = teacher_cache.TeacherCache(cfg.teacher_cache)
    if cfg.loss.intermediate:
        raise UserError("loss.intermediate compares hidden states with the teacher's, which a teacher cache does "
                        "not hold: distill with teacher= for intermediate losses")
    recorded = cache.manifest.get("data", {})
    for key in ("train", "valid"):
        given = getattr(cfg.data, key)
        if given is not None and str(given) != recorded.get(key):
            raise UserError(f"data.{key}={given}, but teacher_cache={cfg.teacher_cache} holds samples of "
                            f"{recorded.get(key) or 'the embedded corpus'}: the samples come from the cache; leave "
                            f"data.{key} unset")
    cache.check_run(cfg.train)
    if cfg.loss.top_k is None:
        cfg.loss.top_k = cache.k
    cfg.loss.objective().logits.check_cached(cache.k)
    return cache


def _check_cache_student(cache: teacher_cache.TeacherCache, student_arch, tokenizer) -> None:
    if student_arch.vocab_size != cache.manifest["vocab_size"]:
        raise UserError(f"student vocab_size {student_arch.vocab_size} != the cached teacher's "
                        f"{cache.manifest['vocab_size']}")
    if tokenizer_fingerprint(tokenizer) != cache.manifest["tokenizer"]:
        raise UserError(f"the student's tokenizer differs from the one the teacher cache {cache.path} was written "
                        f"with: distillation needs the student to keep the teacher's tokenizer")


# What teacher-logits outputs recorded while their train block was a copy of some TrainConfig keys: the teacher's
# forward batch, which does not decide the samples (a re-run over such an output compares the rest).
_RETIRED_CACHE_SETTINGS = ("train.micro_batch_size",)


@releases_output_locks
def cache_teacher_logits(cfg: TeacherLogitsConfig) -> dict:
    """Write `cfg.teacher`'s top-`cfg.top_k` logits over a distillation run's samples into
    `cfg.output_dir` (resumable: re-running the same command continues)."""
    cfg.require("teacher", "output_dir")
    if cfg.top_k < 1:
        raise UserError(f"top_k={cfg.top_k} must be at least 1")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    cfg.train.validate(layout.dp)
    arch = train_stage.checkpoint_arch(cfg, "teacher")
    # of train.*, only the keys that decide the samples: the cache serves any distill run that draws them
    settings = settings_of(cfg, ignore=[f"train.{key}" for key in TrainConfig.keys_beside_samples()],
                           inputs=["teacher"])
    tokenizer = checkpoint.load_tokenizer(cfg.teacher)
    train_stage.check_data(cfg, tokenizer)
    claim_output(cfg.output_dir, "teacher-logits", [cfg.teacher, cfg.data.train, cfg.data.valid], settings=settings,
                 overwrite=cfg.overwrite, own=teacher_cache.ENTRIES, retired=_RETIRED_CACHE_SETTINGS)
    data = train_stage.training_data(cfg, tokenizer)
    # Norms too, as the teacher beside a student runs (megatron's Float16Module converts all of it).
    teacher = checkpoint.load_checkpoint(cfg.teacher, params_dtype=cfg.torch_dtype).to(cfg.torch_dtype)
    train = cfg.train
    train_samples = train.train_samples
    valid_samples = train.valid_samples if data.valid is not None else 0
    log.info("caching the top-%d logits of %s (%s params) at %s: %d + %d samples of %d tokens, %s bytes per token",
             cfg.top_k, cfg.teacher, f"{arch.num_parameters()['total']:,}", layout.describe(), train_samples,
             valid_samples, train.seq_length, teacher_cache.bytes_per_token(cfg.top_k, cfg.dtype))
    return teacher_cache.write_teacher_cache(
        teacher, data, cfg.output_dir, cfg.top_k, global_batch_size=train.global_batch_size,
        micro_batch_size=train.micro_batch_size, train_samples=train_samples, valid_samples=valid_samples,
        progress=train.progress_bar,
        manifest={"teacher": str(cfg.teacher), "teacher_content": content_id(cfg.teacher),
                  "tokenizer": tokenizer_fingerprint(tokenizer), "seed": cfg.seed,
                  "data": {"train": cfg.data.train, "valid": cfg.data.valid}},
    )


@releases_output_locks
def correct_teacher(cfg: TeacherCorrectConfig) -> dict:
    """Fine-tune `cfg.teacher` with the LM loss at 1/5 of its original peak LR (by default) with
    the loop of distillation; the corrected teacher lands in OUTPUT/final."""
    cfg.require("teacher", "output_dir")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    cfg = cfg.with_schedule()
    train_stage.checkpoint_arch(cfg, "teacher")
    tokenizer = checkpoint.load_tokenizer(cfg.teacher)
    train_stage.check_data(cfg, tokenizer)
    done = train_stage.start_run(cfg, "teacher-correct", [cfg.teacher, cfg.data.train, cfg.data.valid], ["teacher"])
    if done is not None:
        return done
    data = train_stage.training_data(cfg, tokenizer)
    model = train_stage.load_for_training(cfg.teacher, cfg)
    log.info("correcting %s at %s: lr %.3g -> %.3g, %d warmup steps", cfg.teacher, layout.describe(),
             cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_for(cfg.train.steps))
    trainer = Trainer(
        model, LMLoss(), data, cfg.train, cfg.optim, cfg.output_dir, tokenizer=tokenizer,
        metadata={"stage": "teacher-correct", "teacher": str(cfg.teacher)},
        signature=train_stage.signature(cfg, "teacher", "data", "dtype", "seed"),
    )
    return train_stage.result(trainer.fit())
