"""minitron align: SFT, DPO, RPO and SteerLM on the training loop of distillation.

DPO/RPO train the policy against a frozen reference on the same ranks: the pair runs as a
`DistillationModel` (student = policy, teacher = reference), so pipeline parallelism carries both.
Before and after training the stage measures its held-out objective: response-only loss (SFT,
SteerLM) or preference accuracy (DPO, RPO).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_minitron import checkpoint, parallel
from nemo_minitron.align import datasets as ds
from nemo_minitron.align.builtin_data import build_alignment_data
from nemo_minitron.align.evaluate import preference_accuracy, response_loss
from nemo_minitron.align.losses import PreferenceLoss
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.data.corpus import default_cache_dir
from nemo_minitron.train import Trainer, stage
from nemo_minitron.train.data import TrainingData, default_corpus
from nemo_minitron.train.loss import LMLoss

log = logging.getLogger("nemo_minitron")

STAGES = ("sft", "dpo", "rpo", "steerlm")
_BUILTIN_FILE = {"sft": "sft", "steerlm": "steerlm", "dpo": "dpo", "rpo": "dpo"}


def data_paths(cfg) -> tuple[Path, Path | None]:
    """The training and held-out jsonl files (collective: rank 0 builds the built-in set)."""
    if cfg.data is not None:
        return Path(cfg.data), (Path(cfg.valid_data) if cfg.valid_data else None)
    if cfg.valid_data is not None:
        raise ValueError("valid_data is set but data is not: set data= too")
    cache = Path(cfg.builtin.cache_dir) if cfg.builtin.cache_dir else default_cache_dir() / "alignment"
    corpus = default_corpus(cache, seed=cfg.seed)["train"].parent
    out = cache / f"builtin-{cfg.builtin.train_examples}-{cfg.builtin.heldout_examples}-{cfg.seed}"
    if parallel.is_main_process():
        build_alignment_data(corpus, out, cfg.builtin.train_examples, cfg.builtin.heldout_examples, cfg.seed)
    stage_barrier()
    name = _BUILTIN_FILE[cfg.stage]
    return out / f"{name}_train.jsonl", out / f"{name}_heldout.jsonl"


def stage_barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def read_datasets(cfg, tokenizer, seq_length: int, train_path: Path, valid_path: Path | None):
    if cfg.stage in ("dpo", "rpo"):
        read = lambda p: ds.PreferenceDataset(ds.read_preferences(p, need_rewards=cfg.stage == "rpo"), tokenizer, seq_length)  # noqa: E731
    else:
        reader = ds.read_steerlm if cfg.stage == "steerlm" else ds.read_sft
        read = lambda p: ds.SFTDataset(reader(p), tokenizer, seq_length, pack=cfg.sft.pack)  # noqa: E731
    train = read(train_path)
    valid = read(valid_path) if valid_path else None
    for name, d in (("train", train), ("valid", valid)):
        if d is not None and d.truncated:
            log.warning("%s data: %d of %d sequences were longer than train.seq_length=%d and were truncated",
                        name, d.truncated, len(d), seq_length)
    return train, valid


def held_out_score(cfg, model, valid) -> dict[str, float]:
    if valid is None:
        return {}
    if cfg.stage in ("dpo", "rpo"):
        return {"heldout_preference_accuracy": preference_accuracy(model, valid, cfg.train.micro_batch_size)}
    return {"heldout_response_loss": response_loss(model, valid, cfg.train.micro_batch_size)}


def run(cfg) -> dict:
    if cfg.stage not in STAGES:
        raise ValueError(f"stage={cfg.stage} is not one of {', '.join(STAGES)}")
    if cfg.backend == "nemo_aligner":
        from nemo_minitron.align.nemo_aligner import run_nemo_aligner

        return run_nemo_aligner(cfg)
    if cfg.backend != "native":
        raise ValueError(f"backend={cfg.backend} is not one of native, nemo_aligner")
    done = stage.finished(cfg.output_dir)
    if done is not None:
        log.info("%s/final is complete: nothing to do", cfg.output_dir)
        return done
    preference = cfg.stage in ("dpo", "rpo")
    loss = PreferenceLoss(cfg.loss.kind or cfg.stage, cfg.loss.beta, cfg.loss.eta, cfg.loss.sft_weight) if preference else LMLoss()
    train_cfg, optim_cfg = stage.configs(cfg)
    if preference and (train_cfg.micro_batch_size % 2 or train_cfg.global_batch_size % 2):
        raise ValueError("DPO/RPO train on whole pairs: train.micro_batch_size and train.global_batch_size must be even")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    train_path, valid_path = data_paths(cfg)
    train_set, valid_set = read_datasets(cfg, tokenizer, train_cfg.seq_length, train_path, valid_path)
    unit = 2 if preference else 1
    data = TrainingData(
        ds.RepeatedDataset(train_set, train_cfg.steps * train_cfg.global_batch_size, cfg.seed, unit),
        None if valid_set is None else ds.RepeatedDataset(
            valid_set, max(len(valid_set), train_cfg.eval_batches * train_cfg.global_batch_size), cfg.seed, unit),
    )
    dtype = torch_dtype(cfg.dtype)
    policy = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=dtype)
    module = policy
    if preference:
        from nemo_minitron.distill import DistillationModel, check_same_tokenizer

        reference_dir = cfg.reference or cfg.checkpoint
        check_same_tokenizer(checkpoint.load_tokenizer(reference_dir), tokenizer)
        module = DistillationModel(policy, checkpoint.load_checkpoint(reference_dir, params_dtype=dtype))
    before = held_out_score(cfg, policy, valid_set)
    log.info("align stage=%s on %s (%d training / %d held-out records) at %s; before: %s", cfg.stage,
             cfg.checkpoint, len(train_set) // unit, 0 if valid_set is None else len(valid_set) // unit,
             layout.describe(), before)
    trainer = Trainer(
        module, loss, data, train_cfg, optim_cfg, cfg.output_dir, export_model=policy, tokenizer=tokenizer,
        metadata={"stage": f"align/{cfg.stage}", "source": str(cfg.checkpoint), "data": str(train_path)},
        signature=stage.signature(cfg, "stage", "checkpoint", "reference", "data", "loss", "dtype", "seed"),
    )
    summary = trainer.fit()
    result = stage.result(summary)
    if not summary["interrupted"]:
        after = held_out_score(cfg, policy, valid_set)
        result.update({f"{k}_before": v for k, v in before.items()})
        result.update({f"{k}_after": v for k, v in after.items()})
        log.info("held-out before: %s, after: %s", before, after)
    return result
