"""What the training commands (teacher-correct, distill, later the alignment stages) share:
reading `train` / `optim` / `data` from the Hydra config, preparing the data, and the result."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from nemo_minitron import checkpoint
from nemo_minitron.train.config import OptimConfig, TrainConfig, from_mapping
from nemo_minitron.train.data import TrainingData, gpt_training_data
from nemo_minitron.train.loop import FINAL_DIR


def configs(cfg) -> tuple[TrainConfig, OptimConfig]:
    # throw_on_missing: a required key left at ??? (train.steps) is a one-line "missing required key" error
    train = from_mapping(TrainConfig, OmegaConf.to_container(cfg.train, resolve=True, throw_on_missing=True), "train")
    optim = from_mapping(OptimConfig, OmegaConf.to_container(cfg.optim, resolve=True, throw_on_missing=True), "optim")
    return train, optim


def checkpoint_arch(cfg, key: str):
    """The architecture of the checkpoint named by config key `key`; errors name the key."""
    path = Path(cfg[key])
    if not checkpoint.is_complete(path):
        problem = "does not exist" if not path.exists() else "is not a complete nemo-minitron checkpoint directory"
        raise ValueError(f"{key}={path} {problem}")
    return checkpoint.read_arch(path)


def finished(output_dir: str | Path) -> dict[str, Any] | None:
    """The result of a run whose `final/` checkpoint is already complete (re-running is a no-op)."""
    final = Path(output_dir) / FINAL_DIR
    if not checkpoint.is_complete(final):
        return None
    return {**result(checkpoint.read_metadata(final)["result"]), "already_complete": True}


def training_data(cfg, tokenizer, train: TrainConfig) -> TrainingData:
    """GPT windows of `train.seq_length` tokens over `data.train` / `data.valid` (collective)."""
    return gpt_training_data(
        cfg.data.train, cfg.data.valid, tokenizer, seq_length=train.seq_length,
        train_samples=train.steps * train.global_batch_size,
        valid_samples=train.eval_batches * train.global_batch_size,
        seed=cfg.seed, cache_dir=cfg.data.cache_dir, text_key=cfg.data.text_key,
    )


def signature(cfg, *keys: str) -> dict[str, Any]:
    """The settings among `keys` (dotted) that a resumed run must share with the one it resumes."""
    return {key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            for key in keys for value in [OmegaConf.select(cfg, key)]}


def result(summary: dict[str, Any]) -> dict[str, Any]:
    """The command's JSON result: the loop's summary plus the held-out perplexity."""
    out = dict(summary)
    if "val/lm_loss" in summary.get("valid", {}):
        out["val_perplexity"] = math.exp(summary["valid"]["val/lm_loss"])
    return out
