"""The distillation stages: teacher correction (LM-loss fine-tuning of the teacher on the
distillation data) and knowledge distillation of a student from a frozen teacher on the same
ranks (docs/design.md). Both run the training loop; re-running the same config resumes, and a
finished run returns its result without training."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from nemo_minitron import checkpoint, parallel
from nemo_minitron.distill.losses import LogitLoss
from nemo_minitron.distill.model import DistillationLoss, DistillationModel, LayerPair, check_same_tokenizer
from nemo_minitron.errors import UserError
from nemo_minitron.train import LMLoss, Trainer
from nemo_minitron.train import stage as train_stage
from nemo_minitron.train.config import OptimConfig

log = logging.getLogger("nemo_minitron")


@dataclass
class LossConfig:
    """The distillation objective (see `DistillationLoss` and `LogitLoss`)."""

    kind: str = "fwd_kl"
    temperature: float = 1.0
    top_k: int | None = None
    lm_weight: float = 0.0
    intermediate: list[Any] = field(default_factory=list)   # "student:teacher" layer pairs (0-based)
    dynamic_balance: bool = True
    intermediate_weight: float = 1.0
    chunk_tokens: int = 128

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
    teacher: str | None = None
    student: str | None = None
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TeacherCorrectConfig(train_stage.TrainingStageConfig):
    teacher: str | None = None
    original_peak_lr: float = 3.0e-4   # the teacher's pre-training peak LR; optim.lr defaults to 1/5 of it
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=None, min_lr=None, warmup_steps=120))


def distill_checkpoint(cfg: DistillConfig) -> dict:
    """Train `cfg.student` on `cfg.teacher`'s logits; the student lands in OUTPUT/final."""
    cfg.require("teacher", "student", "output_dir")
    loss = cfg.loss.objective()
    pairs = cfg.loss.layer_pairs()
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    teacher_arch = train_stage.checkpoint_arch(cfg, "teacher")
    student_arch = train_stage.checkpoint_arch(cfg, "student")
    done = train_stage.start_run(cfg, "distill", [cfg.teacher, cfg.student, cfg.data.train, cfg.data.valid],
                                 ["teacher", "student"])
    if done is not None:
        return done
    tokenizer = checkpoint.load_tokenizer(cfg.student)
    check_same_tokenizer(checkpoint.load_tokenizer(cfg.teacher), tokenizer)
    data = train_stage.training_data(cfg, tokenizer)
    teacher = checkpoint.load_checkpoint(cfg.teacher, params_dtype=cfg.torch_dtype)
    student = checkpoint.load_checkpoint(cfg.student, params_dtype=cfg.torch_dtype)
    model = DistillationModel(student, teacher, pairs, projection_seed=cfg.seed)
    log.info("distilling %s (%s params) from %s (%s params) at %s, loss %s", cfg.student,
             f"{student_arch.num_parameters()['total']:,}", cfg.teacher, f"{teacher_arch.num_parameters()['total']:,}",
             layout.describe(), loss.logits.kind)
    trainer = Trainer(
        model, loss, data, cfg.train, cfg.optim, cfg.output_dir, export_model=student, tokenizer=tokenizer,
        metadata={"stage": "distill", "teacher": str(cfg.teacher), "student": str(cfg.student)},
        signature=train_stage.signature(cfg, "teacher", "student", "loss", "data", "dtype", "seed"),
    )
    return train_stage.result(trainer.fit())


def correct_teacher(cfg: TeacherCorrectConfig) -> dict:
    """Fine-tune `cfg.teacher` with the LM loss at 1/5 of its original peak LR (by default) with
    the loop of distillation; the corrected teacher lands in OUTPUT/final."""
    cfg.require("teacher", "output_dir")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    if cfg.optim.lr is None:
        cfg.optim.lr = cfg.original_peak_lr / 5
    if cfg.optim.min_lr is None:
        cfg.optim.min_lr = cfg.optim.lr / 10
    train_stage.checkpoint_arch(cfg, "teacher")
    done = train_stage.start_run(cfg, "teacher-correct", [cfg.teacher, cfg.data.train, cfg.data.valid], ["teacher"])
    if done is not None:
        return done
    tokenizer = checkpoint.load_tokenizer(cfg.teacher)
    data = train_stage.training_data(cfg, tokenizer)
    model = checkpoint.load_checkpoint(cfg.teacher, params_dtype=cfg.torch_dtype)
    log.info("correcting %s at %s: lr %.3g -> %.3g, %d warmup steps", cfg.teacher, layout.describe(),
             cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps)
    trainer = Trainer(
        model, LMLoss(), data, cfg.train, cfg.optim, cfg.output_dir, tokenizer=tokenizer,
        metadata={"stage": "teacher-correct", "teacher": str(cfg.teacher)},
        signature=train_stage.signature(cfg, "teacher", "data", "dtype", "seed"),
    )
    return train_stage.result(trainer.fit())
