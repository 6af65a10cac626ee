"""minitron teacher-correct: fine-tune the teacher on the distillation data with the LM loss before
pruning (DESIGN.md section 1: LR 1/5 of the original peak, 120 warmup steps), with the same loop
as distillation. Re-running the same command resumes; a finished run is a no-op."""

from __future__ import annotations

import logging

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.train import LMLoss, Trainer
from nemo_minitron.train import stage

log = logging.getLogger("nemo_minitron")


def run(cfg) -> dict:
    done = stage.finished(cfg.output_dir)
    if done is not None:
        log.info("%s/final is complete: nothing to do", cfg.output_dir)
        return done
    if cfg.optim.lr is None:
        cfg.optim.lr = cfg.original_peak_lr / 5
    if cfg.optim.min_lr is None:
        cfg.optim.min_lr = cfg.optim.lr / 10
    train_cfg, optim_cfg = stage.configs(cfg)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    stage.checkpoint_arch(cfg, "teacher").check_parallel(layout.tp, layout.pp)
    tokenizer = checkpoint.load_tokenizer(cfg.teacher)
    data = stage.training_data(cfg, tokenizer, train_cfg)
    model = checkpoint.load_checkpoint(cfg.teacher, params_dtype=torch_dtype(cfg.dtype))
    log.info("correcting %s at %s: lr %.3g -> %.3g, %d warmup steps", cfg.teacher, layout.describe(),
             optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps)
    trainer = Trainer(
        model, LMLoss(), data, train_cfg, optim_cfg, cfg.output_dir, tokenizer=tokenizer,
        metadata={"stage": "teacher-correct", "teacher": str(cfg.teacher)},
        signature=stage.signature(cfg, "teacher", "data", "dtype", "seed"),
    )
    return stage.result(trainer.fit())
