"""minitron distill: train a student on a frozen teacher's logits, teacher and student on the same
ranks (DESIGN.md section 7). Re-running the same command resumes; a finished run is a no-op."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.distill import DistillationLoss, DistillationModel, LayerPair, LogitLoss, check_same_tokenizer
from nemo_minitron.train import Trainer
from nemo_minitron.train import stage

log = logging.getLogger("nemo_minitron")


def layer_pairs(values) -> tuple[LayerPair, ...]:
    """loss.intermediate entries, each "student:teacher" or [student, teacher] (0-based layers)."""
    pairs = []
    for value in OmegaConf.to_container(values, resolve=True) if OmegaConf.is_config(values) else values:
        parts = str(value).split(":") if isinstance(value, str) else list(value)
        try:
            student, teacher = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"loss.intermediate entry {value!r} is not 'student_layer:teacher_layer'") from None
        pairs.append(LayerPair(student, teacher))
    return tuple(pairs)


def distillation_loss(cfg) -> DistillationLoss:
    loss = cfg.loss
    return DistillationLoss(
        LogitLoss(loss.kind, float(loss.temperature), loss.top_k, float(loss.lm_weight)),
        dynamic_balance=bool(loss.dynamic_balance), intermediate_weight=float(loss.intermediate_weight),
        chunk_tokens=int(loss.chunk_tokens),
    )


def run(cfg) -> dict:
    done = stage.finished(cfg.output_dir)
    if done is not None:
        log.info("%s/final is complete: nothing to do", cfg.output_dir)
        return done
    loss = distillation_loss(cfg)
    pairs = layer_pairs(cfg.loss.intermediate)
    train_cfg, optim_cfg = stage.configs(cfg)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    teacher_arch, student_arch = stage.checkpoint_arch(cfg, "teacher"), stage.checkpoint_arch(cfg, "student")
    teacher_arch.check_parallel(layout.tp, layout.pp)
    student_arch.check_parallel(layout.tp, layout.pp)
    tokenizer = checkpoint.load_tokenizer(cfg.student)
    check_same_tokenizer(checkpoint.load_tokenizer(cfg.teacher), tokenizer)
    data = stage.training_data(cfg, tokenizer, train_cfg)
    dtype = torch_dtype(cfg.dtype)
    teacher = checkpoint.load_checkpoint(cfg.teacher, params_dtype=dtype)
    student = checkpoint.load_checkpoint(cfg.student, params_dtype=dtype)
    model = DistillationModel(student, teacher, pairs, projection_seed=cfg.seed)
    log.info("distilling %s (%s params) from %s (%s params) at %s, loss %s", cfg.student,
             f"{student_arch.num_parameters()['total']:,}", cfg.teacher, f"{teacher_arch.num_parameters()['total']:,}",
             layout.describe(), loss.logits.kind)
    trainer = Trainer(
        model, loss, data, train_cfg, optim_cfg, cfg.output_dir, export_model=student, tokenizer=tokenizer,
        metadata={"stage": "distill", "teacher": str(cfg.teacher), "student": str(cfg.student)},
        signature=stage.signature(cfg, "teacher", "student", "loss", "data", "dtype", "seed"),
    )
    return stage.result(trainer.fit())
