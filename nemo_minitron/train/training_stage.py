"""What the training stages (teacher correction, distillation, alignment) share: their typed
settings, preparing the data, the resume signature and the result."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import UserError
from nemo_minitron.outputs import claim_output, settings_of
from nemo_minitron.stage_config import StageConfig, nested
from nemo_minitron.train.config import DataConfig, OptimConfig, TrainConfig
from nemo_minitron.train.data import TrainingData, check_training_data, gpt_training_data
from nemo_minitron.train.loop import CADENCE_KEYS, FINAL_DIR, RUN_ENTRIES

log = logging.getLogger("nemo_minitron")


@dataclass
class TrainingStageConfig(StageConfig):
    """A training stage's output directory, data, run length and optimizer. `dtype` defaults to
    `auto`: bf16 mixed precision where the device computes bf16 natively (`stage_config.auto_dtype`)."""

    # bf16 mixed precision (fp32 main weights, gradients and loss reductions) where the device computes bf16 natively,
    # else float32; or float32 | bfloat16 | float16
    dtype: str = "auto"
    # where final/ (the distilled student), checkpoints/, tensorboard/ and metrics.jsonl go
    output_dir: str | None = None
    data: DataConfig = nested(DataConfig)
    train: TrainConfig = nested(TrainConfig)
    # the practice paper's distillation schedule (peak 1e-4, min 1e-5, cosine), fewer warmup steps
    optim: OptimConfig = nested(OptimConfig)


def checkpoint_arch(cfg, key: str):
    """The architecture of the checkpoint named by config key `key`, checked against the run's
    sequence length and parallel layout; errors name the key."""
    cfg.require(key)
    path = Path(getattr(cfg, key))
    if not checkpoint.is_complete(path):
        problem = "does not exist" if not path.exists() else "is not a complete nemo-minitron checkpoint directory"
        raise UserError(f"{key}={path} {problem}")
    arch = checkpoint.read_arch(path)
    arch.check_positions(cfg.train.seq_length, "train.seq_length")
    layout = parallel.layout()
    arch.check_parallel(layout.tp, layout.pp, layout.ep)
    return arch


def check_settings(cfg: TrainingStageConfig, layout: parallel.ParallelLayout) -> None:
    """`train.*` and `optim.*` against each other and the parallel layout (UserError naming the key)."""
    cfg.train.validate(layout.dp, layout.tp)
    cfg.optim.validate(cfg.train.steps)


def start_run(cfg: TrainingStageConfig, stage: str, inputs: Iterable[str | Path | None],
              checkpoints: Iterable[str]) -> dict[str, Any] | None:
    """Check the run's settings, then claim `cfg.output_dir` for a run of `stage` with them and the
    content of its input `checkpoints` (config keys) (collective, after `parallel.initialize`; see
    `outputs.claim_output`). Returns the earlier result if that run has finished, else None."""
    check_settings(cfg, parallel.layout())
    settings = settings_of(cfg, ignore=[f"train.{key}" for key in CADENCE_KEYS], inputs=checkpoints)
    claim_output(cfg.output_dir, stage, inputs, settings=settings, overwrite=cfg.overwrite, own=RUN_ENTRIES)
    done = finished(cfg.output_dir)
    if done is not None:
        log.info("%s/%s is complete with these settings: nothing to do", cfg.output_dir, FINAL_DIR)
    return done


def finished(output_dir: str | Path) -> dict[str, Any] | None:
    """The result of a run whose `final/` checkpoint is already complete (re-running is a no-op)."""
    final = Path(output_dir) / FINAL_DIR
    if not checkpoint.is_complete(final):
        return None
    return {**result(checkpoint.read_metadata(final)["result"]), "already_complete": True}


def load_for_training(path: str | Path, cfg: TrainingStageConfig):
    """A model of a training run (the trained one, or a frozen teacher or reference beside it),
    sequence parallel at tp > 1 as megatron trains there: activations outside attention and MLP
    split along the sequence over the TP ranks, which an MoE's experts need (each rank routes its
    own tokens) and which cuts activation memory by TP (collective)."""
    return checkpoint.load_checkpoint(path, params_dtype=cfg.torch_dtype, sequence_parallel=parallel.layout().tp > 1)


def check_data(cfg: TrainingStageConfig, tokenizer) -> None:
    """`data.train` / `data.valid` readable and long enough, before any work (collective)."""
    check_training_data(cfg.data.train, cfg.data.valid, tokenizer, seq_length=cfg.train.seq_length,
                        cache_dir=cfg.data.cache_dir, text_key=cfg.data.text_key)


def training_data(cfg: TrainingStageConfig, tokenizer) -> TrainingData:
    """GPT windows of `train.seq_length` tokens over `data.train` / `data.valid` (collective)."""
    train = cfg.train
    return gpt_training_data(
        cfg.data.train, cfg.data.valid, tokenizer, seq_length=train.seq_length,
        train_samples=train.train_samples, valid_samples=train.valid_samples,
        seed=cfg.seed, cache_dir=cfg.data.cache_dir, text_key=cfg.data.text_key,
    )


def signature(cfg, *keys: str) -> dict[str, Any]:
    """The settings among `keys` that a resumed run must share with the one it resumes."""
    values = {key: getattr(cfg, key) for key in keys}
    return {key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for key, v in values.items()}


def result(summary: dict[str, Any]) -> dict[str, Any]:
    """The stage's JSON result: the loop's summary plus the held-out perplexity."""
    out = dict(summary)
    if "val/lm_loss" in summary.get("valid", {}):
        out["val_perplexity"] = math.exp(summary["valid"]["val/lm_loss"])
    return out
