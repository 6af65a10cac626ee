"""Typed settings of a training run: what to run (`TrainConfig`) and how to step (`OptimConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from nemo_minitron.errors import UserError
from nemo_minitron.stage_config import check_ranges, nested


SPIKE_ACTIONS = ("skip", "stop")


@dataclass
class SpikeConfig:
    """The loss-spike guard (as Megatron's spiky-loss check): a step whose training loss exceeds
    `factor` x the median loss of the `window` steps before it is a spike. `skip` leaves the weights
    untouched for that step (its batch is consumed, the LR schedule advances); `stop` ends the run as
    diverged, as do more than `max_skips` spikes in a row. `factor` 0 turns the guard off; the first
    `window` steps are never judged."""

    factor: float = 10.0   # 0 turns the guard off
    window: int = 20   # steps of history (the first `window` steps are not judged)
    action: str = "skip"   # skip: no update for that step | stop: end the run as diverged (exit 3)
    max_skips: int = 3   # more spikes than this in a row stop the run
    POSITIVE: ClassVar[tuple[str, ...]] = ("window",)
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("factor", "max_skips")


@dataclass
class TrainConfig:
    """Steps, batch geometry, and the cadence of logging, validation and checkpoints."""

    steps: int = 0              # optimizer steps (required: at least 1)
    global_batch_size: int = 8   # sequences per optimizer step, over all data-parallel replicas
    seq_length: int = 512   # tokens per sequence
    micro_batch_size: int = 1   # sequences per forward/backward pass on a replica (the rest is gradient accumulation)
    log_interval: int = 10   # log the training metrics every N steps
    eval_interval: int = 0      # validate every N steps (0: after the last step only)
    eval_batches: int = 2       # global batches of held-out data per validation
    save_interval: int = 50     # step checkpoint every N steps (and always on SIGTERM / SIGUSR1)
    keep_checkpoints: int = 2   # newest step checkpoints kept on disk
    keep_models: bool = False   # older step checkpoints keep their model/ (for eval and export), not what resuming needs
    progress_bar: bool = True   # on a terminal
    # loss-spike guard: loss > factor x median of the last `window` steps
    spike: SpikeConfig = nested(SpikeConfig)
    POSITIVE: ClassVar[tuple[str, ...]] = ("global_batch_size", "seq_length", "micro_batch_size", "log_interval",
                                           "keep_checkpoints")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("steps", "eval_interval", "eval_batches", "save_interval")
    # The keys that decide which samples a run draws (with the data and the seed): `train_samples` training and
    # `valid_samples` held-out windows of seq_length tokens. A teacher cache records these and holds those samples;
    # the others (micro-batching, logging, validation and checkpoint cadence, the spike guard) only say how to run.
    SAMPLE_KEYS: ClassVar[tuple[str, ...]] = ("steps", "global_batch_size", "seq_length", "eval_batches")

    @classmethod
    def keys_beside_samples(cls) -> tuple[str, ...]:
        """The keys not in `SAMPLE_KEYS` (nested configs by their own key)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.SAMPLE_KEYS)

    @property
    def train_samples(self) -> int:
        """Training samples a run of these settings draws."""
        return self.steps * self.global_batch_size

    @property
    def valid_samples(self) -> int:
        """Held-out samples per validation."""
        return self.eval_batches * self.global_batch_size

    def validate(self, dp: int, sequence_shards: int = 1) -> None:
        """Raise UserError naming the key to fix when a value is out of range, the batch does not
        split over `dp` replicas or the sequence over `sequence_shards` TP ranks (sequence parallelism)."""
        check_ranges(self, "train.")
        if self.steps < 1:
            raise UserError(f"train.steps must be at least 1, got {self.steps}")
        if self.seq_length % sequence_shards:
            raise UserError(f"train.seq_length={self.seq_length} is not a multiple of tp={sequence_shards}: training "
                            f"at tp > 1 splits every sequence over the TP ranks (sequence parallelism)")
        if self.spike.action not in SPIKE_ACTIONS:
            raise UserError(f"train.spike.action={self.spike.action!r} is not one of {', '.join(SPIKE_ACTIONS)}")
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise UserError(
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

    lr: float | None = 1e-4     # peak learning rate, reached after warmup
    min_lr: float | None = 1e-5   # learning rate at the end of the decay
    warmup_steps: int | None = 0  # linear warmup from 0 to lr over this many steps (null: a tenth of train.steps)
    decay_style: str = "cosine"   # cosine | linear | constant
    weight_decay: float = 0.1   # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9   # Adam first-moment decay
    adam_beta2: float = 0.95   # Adam second-moment decay
    adam_eps: float = 1e-8   # Adam denominator epsilon
    clip_grad: float = 1.0        # global gradient-norm clip (0: off)
    POSITIVE: ClassVar[tuple[str, ...]] = ("lr", "adam_eps")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("min_lr", "warmup_steps", "weight_decay", "clip_grad")

    def warmup_for(self, steps: int) -> int:
        """The warm-up steps of a run of `steps` steps: `warmup_steps`, or a tenth of the run when unset
        (so a retraining sized by another key, such as search.retrain_steps, warms up in proportion)."""
        return steps // 10 if self.warmup_steps is None else self.warmup_steps

    def validate(self, steps: int) -> None:
        for key in ("lr", "min_lr"):
            if getattr(self, key) is None:
                raise UserError(f"missing required key: set optim.{key}=...")
        check_ranges(self, "optim.")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"optim.min_lr={self.min_lr} must lie between 0 and optim.lr={self.lr}")
        if not 0 <= self.warmup_for(steps) < steps:
            raise UserError(f"optim.warmup_steps={self.warmup_steps} must be below train.steps={steps}")
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise UserError(f"optim.decay_style={self.decay_style!r} is not one of cosine, linear, constant")


@dataclass
class DataConfig:
    """Training and held-out text: .jsonl/.txt files or directories, or indexed-dataset prefixes
    (both None: the built-in corpus's train and held-out splits)."""

    train: str | None = None   # .jsonl/.txt file or directory, or an indexed-dataset prefix; null: the embedded corpus
    valid: str | None = None   # held-out data for validation (with train null: the corpus's held-out split)
    cache_dir: str | None = None    # tokenized datasets and the default corpus (null: $NEMO_MINITRON_CACHE/training)
    text_key: str = "text"   # field holding the text in .jsonl files
