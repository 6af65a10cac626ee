"""The alignment stage (SFT, DPO, RPO, SteerLM on the training loop of distillation) and
generation with a checkpoint (optionally conditioned on SteerLM attribute values).

DPO/RPO train the policy against a frozen reference on the same ranks: the pair runs as a
`DistillationModel` (student = policy, teacher = reference), so pipeline parallelism carries both.
Before and after training the stage measures its held-out objective: response-only loss (SFT,
SteerLM) or preference accuracy (DPO, RPO).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

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
from nemo_minitron.stage_config import StageConfig, nested
from nemo_minitron.train import Trainer
from nemo_minitron.train import training_stage as train_stage
from nemo_minitron.train.config import DataConfig, OptimConfig, TrainConfig
from nemo_minitron.train.data import TrainingData
from nemo_minitron.train.loss import LMLoss

log = logging.getLogger("nemo_minitron")

METHODS = ("sft", "dpo", "rpo", "steerlm")
_BUILTIN_FILE = {"sft": "sft", "steerlm": "steerlm", "dpo": "dpo", "rpo": "dpo"}


@dataclass
class BuiltinAlignData:
    """The offline alignment data made from the built-in corpus when `data.train` is not set."""

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
class AlignConfig(train_stage.TrainingStageConfig):
    """The alignment stage: the training stages' keys (`output_dir`, `data.*`, `train.*`, `optim.*`,
    `dtype: auto`), the model to align as `student` and the method's own keys. Deprecated aliases,
    each accepted with a warning: `stage` (method), `checkpoint` (student), `valid_data` (data.valid)
    and `data=PATH` (data.train; a string where the data block stands, see `old_spellings`)."""

    method: str | None = None            # required: sft | dpo | rpo | steerlm
    stage: str | None = None             # deprecated alias of method (warns)
    # the model to align, e.g. the distilled student (DPO/RPO: also the frozen reference unless `reference` is set)
    student: str | None = None
    checkpoint: str | None = None   # deprecated alias of student (warns)
    reference: str | None = None   # DPO/RPO reference model (null: the student)
    output_dir: str | None = None   # where final/ (the aligned model), checkpoints/, tensorboard/ and metrics.jsonl go
    backend: str = "native"   # native | nemo_aligner (in the NGC NeMo container with NeMo-Aligner)
    # data.train / data.valid: training / held-out jsonl in NeMo-Aligner's format for the method (data.train null: a
    # data set built from the corpus, with its held-out examples); data.cache_dir and data.text_key do not apply
    data: DataConfig = nested(DataConfig)
    valid_data: str | None = None   # deprecated alias of data.valid (warns)
    builtin: BuiltinAlignData = nested(BuiltinAlignData)   # the built-in data set
    train: TrainConfig = nested(TrainConfig, steps=100, micro_batch_size=2, seq_length=256, eval_batches=1)
    optim: OptimConfig = nested(OptimConfig, lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0, adam_beta2=0.98)
    sft: SFTConfig = nested(SFTConfig)   # SFT / SteerLM only
    loss: PreferenceLossConfig = nested(PreferenceLossConfig)   # DPO / RPO only
    nemo_aligner: NemoAlignerConfig = nested(NemoAlignerConfig)   # backend=nemo_aligner

    def __post_init__(self):
        super().__post_init__()
        self.method, self.stage = _alias("method", self.method, "stage", self.stage), None
        self.student, self.checkpoint = _alias("student", self.student, "checkpoint", self.checkpoint), None
        if isinstance(self.data, str):  # the old `data=PATH` (from Python; a composed config: `old_spellings`)
            _deprecated("data", "data.train", self.data)
            self.data = DataConfig(train=self.data)
        elif self.data is None:  # the old `data=None`: the built-in data, as data.train=None is now
            self.data = DataConfig()
        if self.valid_data is not None:
            valid = _alias("data.valid", self.data.valid, "valid_data", self.valid_data)
            self.data, self.valid_data = dataclasses.replace(self.data, valid=valid), None

    @classmethod
    def old_spellings(cls, tree: dict[str, Any]) -> None:
        """The old `data=PATH` of a composed config (`minitron align data=FILE`, a recipe's `data:
        FILE`), a string where the `data` block now stands, as data.train=PATH with a warning, and
        the old `data=null` as the block's defaults: the typed merge cannot put either into
        `data: DataConfig` (`compose.typed` calls this first)."""
        if isinstance(tree.get("data"), str):
            _deprecated("data", "data.train", tree["data"])
            tree["data"] = {"train": tree["data"]}
        elif "data" in tree and tree["data"] is None:
            del tree["data"]

    @property
    def preference(self) -> bool:
        return self.method in ("dpo", "rpo")


def _deprecated(old: str, new: str, value: Any) -> None:
    warnings.warn(f"align: the key `{old}=` is deprecated, use `{new}=`", FutureWarning, stacklevel=2)
    log.warning("align: %s=%s is deprecated: use %s=%s", old, value, new, value)


def _alias(key: str, value: Any, old: str, old_value: Any) -> Any:
    """The value of `key` given it and its deprecated alias `old` (set: a warning; both set and
    different: UserError)."""
    if old_value is None:
        return value
    _deprecated(old, key, old_value)
    if value is not None and value != old_value:
        raise UserError(f"{key}={value} and its deprecated alias {old}={old_value} disagree")
    return old_value


def check_data_keys(cfg: AlignConfig) -> None:
    """UserError for a `data.*` key alignment does not read (it reads NeMo-Aligner's jsonl formats
    as they are: no text field, no tokenized cache), or data.valid without data.train; before any work."""
    for key, default in (("cache_dir", None), ("text_key", "text")):
        if getattr(cfg.data, key) != default:
            raise UserError(f"data.{key}={getattr(cfg.data, key)} does not apply to align, which reads "
                            f"NeMo-Aligner's jsonl formats from data.train / data.valid: leave it unset")
    if cfg.data.valid is not None and cfg.data.train is None:
        raise UserError("data.valid is set but data.train is not: set data.train= too (both null: the built-in "
                        "data set and its held-out examples)")


def data_paths(cfg: AlignConfig) -> tuple[Path, Path | None]:
    """The training and held-out jsonl files (collective: rank 0 builds the built-in set)."""
    if cfg.data.train is not None:
        return Path(cfg.data.train), (Path(cfg.data.valid) if cfg.data.valid else None)
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
    """Align `cfg.student` with `cfg.method`; the aligned model lands in OUTPUT/final."""
    cfg.require("method", "student", "output_dir")
    if cfg.method not in METHODS:
        raise UserError(f"method={cfg.method} is not one of {', '.join(METHODS)}")
    check_data_keys(cfg)
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
    train_stage.checkpoint_arch(cfg, "student")
    if cfg.reference:
        train_stage.checkpoint_arch(cfg, "reference")
    tokenizer = checkpoint.load_tokenizer(cfg.student)
    train_path, valid_path = data_paths(cfg)
    train_set, valid_set = read_datasets(cfg, tokenizer, train_path, valid_path)  # bad records fail here
    done = train_stage.start_run(cfg, "align", [cfg.student, cfg.reference, cfg.data.train, cfg.data.valid],
                                 ["student", "reference"])
    if done is not None:
        return done
    unit = 2 if cfg.preference else 1
    data = TrainingData(
        ds.RepeatedDataset(train_set, train_cfg.steps * train_cfg.global_batch_size, cfg.seed, unit),
        None if valid_set is None else ds.RepeatedDataset(
            valid_set, max(len(valid_set), train_cfg.eval_batches * train_cfg.global_batch_size), cfg.seed, unit),
    )
    policy = train_stage.load_for_training(cfg.student, cfg)
    module = policy
    if cfg.preference:
        from nemo_minitron.distill import DistillationModel, check_same_tokenizer

        reference_dir = cfg.reference or cfg.student
        check_same_tokenizer(checkpoint.load_tokenizer(reference_dir), tokenizer)
        module = DistillationModel(policy, train_stage.load_for_training(reference_dir, cfg))
    before = held_out_score(cfg, policy, valid_set)
    log.info("align method=%s on %s (%d training / %d held-out records) at %s; before: %s", cfg.method,
             cfg.student, len(train_set) // unit, 0 if valid_set is None else len(valid_set) // unit,
             layout.describe(), before)
    trainer = Trainer(
        module, loss, data, train_cfg, cfg.optim, cfg.output_dir, export_model=policy, tokenizer=tokenizer,
        metadata={"stage": f"align/{cfg.method}", "source": str(cfg.student), "data": str(train_path)},
        signature=train_stage.signature(cfg, "method", "student", "reference", "data", "loss", "dtype", "seed"),
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
