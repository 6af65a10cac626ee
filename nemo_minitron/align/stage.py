"""The alignment stage (SFT, DPO, RPO, SteerLM on the training loop of distillation) and
generation with a checkpoint (optionally conditioned on SteerLM attribute values).

DPO/RPO train the policy against a frozen reference on the same ranks: the pair runs as a
`DistillationModel` (student = policy, teacher = reference), so pipeline parallelism carries both.
Before and after training the stage measures its held-out objective: response-only loss (SFT,
SteerLM) or preference accuracy (DPO, RPO).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nemo_minitron import checkpoint, parallel
from nemo_minitron.align import datasets as ds
from nemo_minitron.align.builtin_data import build_alignment_data
from nemo_minitron.align.evaluate import preference_accuracy, response_loss
from nemo_minitron.align.formatting import Turn, generation_prompt
from nemo_minitron.align.losses import PreferenceLoss
from nemo_minitron.data.corpus import default_cache_dir, ensure_corpus
from nemo_minitron.errors import UserError
from nemo_minitron.eval.generate import greedy_generate
from nemo_minitron.outputs import releases_output_locks
from nemo_minitron.stage import StageConfig, nested
from nemo_minitron.train import Trainer
from nemo_minitron.train import stage as train_stage
from nemo_minitron.train.config import OptimConfig, TrainConfig
from nemo_minitron.train.data import TrainingData
from nemo_minitron.train.loss import LMLoss

log = logging.getLogger("nemo_minitron")

METHODS = ("sft", "dpo", "rpo", "steerlm")
_BUILTIN_FILE = {"sft": "sft", "steerlm": "steerlm", "dpo": "dpo", "rpo": "dpo"}


@dataclass
class BuiltinAlignData:
    """The offline alignment data made from the built-in corpus when `data` is not set."""

    cache_dir: str | None = None   # null: $NEMO_MINITRON_CACHE/alignment
    train_examples: int = 512   # training examples it builds
    heldout_examples: int = 64   # held-out examples it builds
    POSITIVE: ClassVar[tuple[str, ...]] = ("train_examples",)
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("heldout_examples",)


@dataclass
class PreferenceLossConfig:
    kind: str | None = None      # null: dpo for method=dpo, rpo for method=rpo; also ipo, rpo_sq
    beta: float = 0.1   # scale of the policy/reference log-ratio margin (larger: stay nearer the reference)
    eta: float = 1.0   # RPO: scale of the reward gap
    sft_weight: float = 0.0   # add the chosen responses' NLL
    POSITIVE: ClassVar[tuple[str, ...]] = ("beta",)
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("eta", "sft_weight")


@dataclass
class SFTConfig:
    pack: bool = False   # pack several conversations per sample (block-diagonal attention)


@dataclass
class NemoAlignerConfig:
    root: str = "/opt/NeMo-Aligner"   # where the container keeps NeMo-Aligner's examples/
    dry_run: bool = False   # print the NeMo-Aligner command instead of running it


@dataclass
class AlignConfig(StageConfig):
    method: str | None = None            # required: sft | dpo | rpo | steerlm
    stage: str | None = None             # deprecated alias of method (warns)
    checkpoint: str | None = None   # the model to align (DPO/RPO: also the frozen reference unless `reference` is set)
    reference: str | None = None   # DPO/RPO reference model (null: the starting checkpoint)
    output_dir: str | None = None   # where final/ (the aligned model), checkpoints/, tensorboard/ and metrics.jsonl go
    backend: str = "native"   # native | nemo_aligner (in the NGC NeMo container with NeMo-Aligner)
    data: str | None = None   # training jsonl in NeMo-Aligner's format for the stage (null: built from the corpus)
    valid_data: str | None = None   # held-out jsonl (null with data=null: the built-in held-out examples)
    builtin: BuiltinAlignData = nested(BuiltinAlignData)   # the built-in data set
    train: TrainConfig = nested(TrainConfig, steps=100, micro_batch_size=2, seq_length=256, eval_batches=1)
    optim: OptimConfig = nested(OptimConfig, lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0, adam_beta2=0.98)
    sft: SFTConfig = nested(SFTConfig)   # SFT / SteerLM only
    loss: PreferenceLossConfig = nested(PreferenceLossConfig)   # DPO / RPO only
    nemo_aligner: NemoAlignerConfig = nested(NemoAlignerConfig)   # backend=nemo_aligner

    def __post_init__(self):
        super().__post_init__()
        if self.stage is not None:
            warnings.warn("align: the key `stage=` is deprecated, use `method=`", FutureWarning, stacklevel=2)
            log.warning("align: stage=%s is deprecated: use method=%s", self.stage, self.stage)
            if self.method is not None and self.method != self.stage:
                raise UserError(f"method={self.method} and its deprecated alias stage={self.stage} disagree")
            self.method, self.stage = self.stage, None

    @property
    def preference(self) -> bool:
        return self.method in ("dpo", "rpo")


def data_paths(cfg: AlignConfig) -> tuple[Path, Path | None]:
    """The training and held-out jsonl files (collective: rank 0 builds the built-in set)."""
    if cfg.data is not None:
        return Path(cfg.data), (Path(cfg.valid_data) if cfg.valid_data else None)
    if cfg.valid_data is not None:
        raise UserError("valid_data is set but data is not: set data= too")
    corpus = ensure_corpus(seed=cfg.seed)["train"].parent
    cache = Path(cfg.builtin.cache_dir) if cfg.builtin.cache_dir else default_cache_dir() / "alignment"
    out = cache / f"builtin-{cfg.builtin.train_examples}-{cfg.builtin.heldout_examples}-{cfg.seed}"
    if parallel.is_main_process():
        build_alignment_data(corpus, out, cfg.builtin.train_examples, cfg.builtin.heldout_examples, cfg.seed)
    parallel.barrier()
    name = _BUILTIN_FILE[cfg.method]
    return out / f"{name}_train.jsonl", out / f"{name}_heldout.jsonl"


def read_datasets(cfg: AlignConfig, tokenizer, train_path: Path, valid_path: Path | None):
    seq_length = cfg.train.seq_length
    if cfg.preference:
        read = lambda p: ds.PreferenceDataset(ds.read_preferences(p, need_rewards=cfg.method == "rpo"), tokenizer, seq_length)  # noqa: E731
    else:
        reader = ds.read_steerlm if cfg.method == "steerlm" else ds.read_sft
        read = lambda p: ds.SFTDataset(reader(p), tokenizer, seq_length, pack=cfg.sft.pack)  # noqa: E731
    train = read(train_path)
    valid = read(valid_path) if valid_path else None
    for name, d in (("train", train), ("valid", valid)):
        if d is not None and d.truncated:
            log.warning("%s data: %d of %d sequences were longer than train.seq_length=%d and were truncated",
                        name, d.truncated, len(d), seq_length)
    return train, valid


def held_out_score(cfg: AlignConfig, model, valid) -> dict[str, float]:
    if valid is None:
        return {}
    if cfg.preference:
        return {"heldout_preference_accuracy": preference_accuracy(model, valid, cfg.train.micro_batch_size)}
    return {"heldout_response_loss": response_loss(model, valid, cfg.train.micro_batch_size)}


@releases_output_locks
def align_checkpoint(cfg: AlignConfig) -> dict:
    """Align `cfg.checkpoint` with `cfg.method`; the aligned model lands in OUTPUT/final."""
    cfg.require("method", "checkpoint", "output_dir")
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method} is not one of {', '.join(METHODS)}")
    if cfg.backend == "nemo_aligner":
        from nemo_minitron.align.nemo_aligner import run_nemo_aligner

        return run_nemo_aligner(cfg)
    if cfg.backend != "native":
        raise UserError(f"backend={cfg.backend} is not one of native, nemo_aligner")
    loss = (PreferenceLoss(cfg.loss.kind or cfg.method, cfg.loss.beta, cfg.loss.eta, cfg.loss.sft_weight)
            if cfg.preference else LMLoss())
    train_cfg = cfg.train
    if cfg.preference and (train_cfg.micro_batch_size % 2 or train_cfg.global_batch_size % 2):
        raise UserError("DPO/RPO train on whole pairs: train.micro_batch_size and train.global_batch_size must be even")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    train_stage.checkpoint_arch(cfg, "checkpoint")
    if cfg.reference:
        train_stage.checkpoint_arch(cfg, "reference")
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    train_path, valid_path = data_paths(cfg)
    train_set, valid_set = read_datasets(cfg, tokenizer, train_path, valid_path)  # bad records fail here
    done = train_stage.start_run(cfg, "align", [cfg.checkpoint, cfg.reference, cfg.data, cfg.valid_data],
                                 ["checkpoint", "reference"])
    if done is not None:
        return done
    unit = 2 if cfg.preference else 1
    data = TrainingData(
        ds.RepeatedDataset(train_set, train_cfg.steps * train_cfg.global_batch_size, cfg.seed, unit),
        None if valid_set is None else ds.RepeatedDataset(
            valid_set, max(len(valid_set), train_cfg.eval_batches * train_cfg.global_batch_size), cfg.seed, unit),
    )
    policy = train_stage.load_for_training(cfg.checkpoint, cfg)
    module = policy
    if cfg.preference:
        from nemo_minitron.distill import DistillationModel, check_same_tokenizer

        reference_dir = cfg.reference or cfg.checkpoint
        check_same_tokenizer(checkpoint.load_tokenizer(reference_dir), tokenizer)
        module = DistillationModel(policy, train_stage.load_for_training(reference_dir, cfg))
    before = held_out_score(cfg, policy, valid_set)
    log.info("align method=%s on %s (%d training / %d held-out records) at %s; before: %s", cfg.method,
             cfg.checkpoint, len(train_set) // unit, 0 if valid_set is None else len(valid_set) // unit,
             layout.describe(), before)
    trainer = Trainer(
        module, loss, data, train_cfg, cfg.optim, cfg.output_dir, export_model=policy, tokenizer=tokenizer,
        metadata={"stage": f"align/{cfg.method}", "source": str(cfg.checkpoint), "data": str(train_path)},
        signature=train_stage.signature(cfg, "method", "checkpoint", "reference", "data", "loss", "dtype", "seed"),
    )
    summary = trainer.fit()
    result = train_stage.result(summary)
    if not summary["interrupted"]:
        after = held_out_score(cfg, policy, valid_set)
        result.update({f"{k}_before": v for k, v in before.items()})
        result.update({f"{k}_after": v for k, v in after.items()})
        log.info("held-out before: %s, after: %s", before, after)
    return result


@dataclass
class GenerateConfig(StageConfig):
    checkpoint: str | None = None   # the checkpoint to generate with
    prompt: str | None = None   # the user message (chat=true) or the text to continue
    system: str | None = None   # optional system message
    attributes: str | None = None        # SteerLM attribute values, e.g. "helpfulness:4,correctness:4"
    chat: bool = True   # wrap the prompt in the tokenizer's chat template (false: raw text continuation)
    max_new_tokens: int = 64   # generate at most this many tokens (fewer at end of sequence)
    max_length: int = 2048   # context window: only the last this many tokens are fed to the model
    POSITIVE: ClassVar[tuple[str, ...]] = (*StageConfig.POSITIVE, "max_new_tokens", "max_length")


def prompt_ids(cfg: GenerateConfig, tokenizer) -> list[int]:
    if not cfg.chat:
        if cfg.attributes or cfg.system:
            raise UserError("attributes= and system= need chat=true")
        return tokenizer(cfg.prompt, add_special_tokens=False).input_ids
    turns = [Turn("system", cfg.system)] if cfg.system else []
    turns.append(Turn("user", cfg.prompt))
    if cfg.attributes:
        # The same place SteerLM training puts them: a system message right before the answer.
        turns.append(Turn("system", ds.attribute_instruction(ds.parse_attributes(cfg.attributes))))
    return generation_prompt(tokenizer, turns)


def generate_text(cfg: GenerateConfig) -> dict:
    """Greedy generation from `cfg.prompt` (a chat turn by default)."""
    cfg.require("checkpoint", "prompt")
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    ids = prompt_ids(cfg, tokenizer)
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=cfg.torch_dtype)
    new_ids, text = greedy_generate(model, tokenizer, ids, cfg.max_new_tokens, cfg.max_length)
    return {"text": text, "new_tokens": len(new_ids), "prompt_tokens": len(ids)}
