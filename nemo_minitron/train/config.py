"""Typed settings of a training run: what to run (`TrainConfig`) and how to step (`OptimConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    """Steps, batch geometry, and the cadence of logging, validation and checkpoints."""

    steps: int
    global_batch_size: int
    seq_length: int
    micro_batch_size: int = 1
    log_interval: int = 1
    eval_interval: int = 0      # validate every N steps (0: only after the last step)
    eval_batches: int = 2       # global batches of held-out data per validation
    save_interval: int = 0      # checkpoint every N steps (0: only at the end or on pre-emption)
    keep_checkpoints: int = 2   # newest step checkpoints kept on disk
    progress_bar: bool = True

    def validate(self, dp: int) -> None:
        """Raise ValueError naming the key to fix when the batch does not split over `dp` replicas."""
        for key in ("steps", "global_batch_size", "seq_length", "micro_batch_size", "log_interval", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("eval_interval", "eval_batches", "save_interval"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must not be negative, got {getattr(self, key)}")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size} x data-parallel size {dp}"
            )

    def micro_batches_per_step(self, dp: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * dp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay, linear warmup, then cosine (or constant/linear) decay to min_lr."""

    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    decay_style: str = "cosine"   # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0        # global gradient-norm clip (0: off)

    def validate(self, steps: int) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} must lie between 0 and optim.lr={self.lr}")
        if not 0 <= self.warmup_steps < steps:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be below train.steps={steps}")
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.decay_style={self.decay_style!r} is not one of cosine, linear, constant")
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optim.clip_grad and optim.weight_decay must not be negative")


def from_mapping(cls, values: Any, prefix: str):
    """A config dataclass from a (Hydra) mapping; unknown keys are an error naming the key."""
    data = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown key {prefix}.{unknown[0]} (known: {', '.join(sorted(known))})")
    return cls(**data)
