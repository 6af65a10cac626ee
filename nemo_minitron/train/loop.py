"""One training loop for every stage that trains (teacher correction, distillation, alignment).

`Trainer(module, loss, data, train_cfg, optim_cfg, output_dir).fit()` trains the parameters of
`module` that require grad at any TP x PP x DP: megatron's DDP, Adam and LR schedule, gradient
accumulation over micro-batches through the forward-backward pipeline schedule
(`models.runner.forward_microbatches`), global-norm clipping, periodic validation, step
checkpoints and exact resume (`train.state`), and a clean stop on SIGTERM / SIGUSR1.

Re-running the same command resumes from the newest complete step checkpoint under output_dir;
when the run completes, the trained model is written to `output_dir/final`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import TrainingDiverged, UserError
from nemo_minitron.models.runner import forward_microbatches
from nemo_minitron.train import state
from nemo_minitron.train.config import OptimConfig, SpikeConfig, TrainConfig
from nemo_minitron.train.data import TrainingData, micro_batches
from nemo_minitron.train.loss import TrainingLoss
from nemo_minitron.train.monitor import Monitor, reduce_metrics
from nemo_minitron.train.optim import build_optimizer, build_scheduler, wrap_data_parallel
from nemo_minitron.train.signals import PreemptionHandler

log = logging.getLogger("nemo_minitron")

FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Everything a run writes into its output directory.
RUN_ENTRIES = (FINAL_DIR, state.CHECKPOINTS_DIR, METRICS_FILE, TENSORBOARD_DIR)
# Settings that change how often a run reports or saves, not what it trains: a run may resume with others.
CADENCE_KEYS = ("log_interval", "eval_interval", "eval_batches", "save_interval", "keep_checkpoints", "keep_models",
                "progress_bar")


class SpikeGuard:
    """Judges each step's loss against the median of the previous `window` (see `SpikeConfig`);
    its history is part of the training state, so a resumed run judges as the uninterrupted one."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.history: list[float] = []
        self.skips = 0

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike; a normal loss joins the history."""
        cfg = self.cfg
        if cfg.factor and len(self.history) >= cfg.window and loss > cfg.factor * statistics.median(self.history):
            self.skips += 1
            return True
        self.history = [*self.history, loss][-cfg.window:]
        self.skips = 0
        return False

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "skips": self.skips}

    def load(self, state: dict[str, Any]) -> None:
        self.history, self.skips = list(state["history"]), state["skips"]


class Trainer:
    """Trains `module` with `loss` on `data`; see the module docstring.

    `export_model` is the `GPTModel` written to checkpoints (default: `module` itself; a
    `DistillationModel` exports its student). Trained parameters outside it (e.g. distillation
    projections) are kept in the training state only. `signature` adds caller settings (model
    paths, loss) that must match for a run to resume.
    """

    def __init__(self, module, loss: TrainingLoss, data: TrainingData, train: TrainConfig, optim: OptimConfig,
                 output_dir: str | Path, *, export_model=None, tokenizer=None, metadata: dict | None = None,
                 signature: dict | None = None):
        self.layout = parallel.layout()
        train.validate(self.layout.dp, self.layout.tp if module.config.sequence_parallel else 1)
        optim.validate(train.steps)
        self.module, self.loss, self.data = module, loss, data
        self.train_cfg, self.optim_cfg = train, optim
        self.output_dir = Path(output_dir).absolute()
        self.export_model = export_model if export_model is not None else module
        self.tokenizer = tokenizer
        self.metadata = metadata or {}
        trained = [p for p in module.parameters() if p.requires_grad]
        if not trained:
            raise ValueError("the module has no trainable parameters")
        if module.config.num_moe_experts and self.layout.tp > 1 and not module.config.sequence_parallel:
            # megatron's MoE layer refuses it too, as "performance may degrade": without sequence
            # parallelism its all-gathered tokens repeat once per TP rank, and so do expert gradients.
            raise UserError(f"training a mixture-of-experts model at tp={self.layout.tp} needs sequence parallelism: "
                            f"build it with sequence_parallel=True (build_gpt_model, checkpoint.load_checkpoint; "
                            f"the training stages do at tp > 1)")
        self.ddp = wrap_data_parallel(module)
        dtype = module.config.params_dtype
        name = str(dtype).removeprefix("torch.")
        log.info("training in %s", name if dtype == torch.float32 else
                 f"{name} mixed precision: {name} weights and activations; fp32 gradients, main weights and "
                 f"optimizer state")
        self.optimizer = build_optimizer(self.ddp, optim, dtype)
        self.scheduler = build_scheduler(self.optimizer, optim, train.steps)
        exported = {id(p) for p in self.export_model.parameters()}
        self.extra = {n: p for n, p in module.named_parameters() if p.requires_grad and id(p) not in exported}
        self.signature = {
            **(signature or {}),
            **{f"train.{k}": v for k, v in dataclasses.asdict(train).items() if k not in CADENCE_KEYS},
            **{f"optim.{k}": v for k, v in dataclasses.asdict(optim).items()},
        }
        self.step = 0
        self.spikes = SpikeGuard(train.spike)

    # --- one step -------------------------------------------------------------------------------

    def _batches(self, dataset, first_sample: int) -> list[dict[str, torch.Tensor]]:
        cfg = self.train_cfg
        return micro_batches(dataset, first_sample, cfg.global_batch_size, cfg.micro_batch_size,
                             self.layout.dp, self.layout.dp_rank)

    def _run(self, batches, forward_only: bool) -> list[dict[str, torch.Tensor]]:
        records: list[dict[str, torch.Tensor]] = []

        def per_microbatch(output, batch):
            loss, metrics = self.loss(output, batch)
            # Copies: the schedule divides the returned loss in place by the number of micro-batches.
            records.append({k: v.detach().clone() for k, v in {"loss": loss, **metrics}.items()})
            return loss

        forward_microbatches(self.ddp, batches, per_microbatch, forward_only=forward_only)
        return records

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch (no update when the loss spikes and the
        guard skips it); returns the reduced metrics."""
        start = time.perf_counter()
        batches = self._batches(self.data.train, self.step * self.train_cfg.global_batch_size)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        records = self._run(batches, forward_only=False)
        metrics = {f"train/{k}": v for k, v in reduce_metrics(records).items()}
        # Reduced over every rank, so every rank makes the same decision.
        spike = math.isfinite(metrics["train/loss"]) and self.spikes.is_spike(metrics["train/loss"])
        self.scheduler.step(1)
        grad_norm = None if spike else self.optimizer.step()[1]
        self.step += 1
        seconds = time.perf_counter() - start
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["train/skipped"] = float(spike)
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["train/step_seconds"] = seconds
        metrics["train/tokens_per_s"] = self.train_cfg.tokens_per_step / seconds
        return metrics

    def validate(self) -> dict[str, float]:
        """Mean loss metrics over `eval_batches` global batches of the held-out data."""
        records: list[dict[str, torch.Tensor]] = []
        for b in range(self.train_cfg.eval_batches):
            batches = self._batches(self.data.valid, b * self.train_cfg.global_batch_size)
            records += self._run(batches, forward_only=True)
        return {f"val/{k}": v for k, v in reduce_metrics(records).items()}

    # --- checkpoints ----------------------------------------------------------------------------

    def _info(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.step * self.train_cfg.global_batch_size,
            "tokens": self.step * self.train_cfg.tokens_per_step,
            "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp},
            "signature": self.signature,
            "spike_guard": self.spikes.state(),
        }

    def save(self) -> Path:
        path = state.save(
            state.step_dir(self.output_dir, self.step), model=self.export_model, tokenizer=self.tokenizer,
            metadata={**self.metadata, "step": self.step}, optimizer=self.optimizer, scheduler=self.scheduler,
            extra=self.extra, info=self._info(),
        )
        state.keep_newest(self.output_dir, self.train_cfg.keep_checkpoints, self.train_cfg.keep_models)
        log.info("saved %s", path)
        return path

    def resume(self) -> bool:
        """Continue from the newest complete step checkpoint, if there is one."""
        found = state.complete_checkpoints(self.output_dir)
        if not found:
            return False
        info = state.check_resumable(found[-1], self.layout, self.signature)
        state.load(found[-1], model=self.export_model, optimizer=self.optimizer, scheduler=self.scheduler,
                   extra=self.extra)
        self.step = info["step"]
        if "spike_guard" in info:  # absent in checkpoints written before the guard existed
            self.spikes.load(info["spike_guard"])
        log.info("resumed from %s (step %d)", found[-1], self.step)
        return True

    # --- the loop -------------------------------------------------------------------------------

    def _check_spikes(self, metrics: dict[str, float], monitor: Monitor) -> None:
        """Log a skipped spike; stop (as diverged) when the guard's action is `stop` or spikes repeat."""
        if not metrics["train/skipped"]:
            return
        cfg = self.train_cfg.spike
        median = statistics.median(self.spikes.history)
        what = (f"loss spike at step {self.step}: loss={metrics['train/loss']:.4g} > {cfg.factor:g} x the median "
                f"{median:.4g} of the previous {cfg.window} steps")
        if cfg.action == "skip" and self.spikes.skips <= cfg.max_skips:
            log.warning("%s: update skipped (%d in a row)", what, self.spikes.skips)
            return
        monitor.step(self.step, metrics, console=True)
        reason = "train.spike.action=stop" if cfg.action == "stop" else f"more than {cfg.max_skips} in a row"
        raise TrainingDiverged(f"{what} ({reason}); no final/ was written and {self._last_checkpoint()}: lower "
                               f"optim.lr or raise optim.warmup_steps and start a new output_dir")

    def _last_checkpoint(self) -> str:
        saved = state.complete_checkpoints(self.output_dir)
        return f"the last checkpoint, {saved[-1]}, predates it" if saved else "no step checkpoint was saved"

    def _check_finite(self, metrics: dict[str, float], monitor: Monitor) -> None:
        """Stop at the first step whose loss or gradient norm is not finite (metrics are reduced over
        all ranks, so every rank stops at the same step): nothing after it is saved, so the step
        checkpoints on disk all predate the divergence."""
        bad = {k: v for k, v in metrics.items() if k in ("train/loss", "train/grad_norm") and not math.isfinite(v)}
        if not bad:
            return
        monitor.step(self.step, metrics, console=True)
        values = ", ".join(f"{k.removeprefix('train/')}={v}" for k, v in bad.items())
        raise TrainingDiverged(f"training diverged at step {self.step} ({values}); no final/ was written and "
                               f"{self._last_checkpoint()}: lower optim.lr or raise optim.warmup_steps and start a new output_dir")

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps` (resuming if possible), validate, write `final/`; returns a summary.

        On SIGTERM / SIGUSR1 it saves a step checkpoint after the current step and returns early
        with `interrupted: true`.
        """
        cfg = self.train_cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        first_step = self.step
        monitor = Monitor(self.output_dir / METRICS_FILE, self.output_dir / TENSORBOARD_DIR, cfg.steps, first_step,
                          cfg.progress_bar)
        train_metrics: dict[str, float] = {}
        val_metrics: dict[str, float] = {}
        seconds = 0.0
        interrupted = False
        try:
            with PreemptionHandler() as preemption:
                while self.step < cfg.steps:
                    train_metrics = self.train_step()
                    self._check_finite(train_metrics, monitor)
                    self._check_spikes(train_metrics, monitor)
                    seconds += train_metrics["train/step_seconds"]
                    last = self.step == cfg.steps
                    metrics = dict(train_metrics)
                    validating = self.data.valid is not None and cfg.eval_batches > 0 and (
                        last or (cfg.eval_interval > 0 and self.step % cfg.eval_interval == 0)
                    )
                    if validating:
                        val_metrics = self.validate()
                        metrics.update(val_metrics)
                    monitor.step(self.step, metrics, console=last or validating or self.step % cfg.log_interval == 0)
                    stop = preemption.requested() and not last
                    if stop or (cfg.save_interval and self.step % cfg.save_interval == 0 and not last):
                        self.save()
                    if stop:
                        interrupted = True
                        log.info("pre-emption signal: checkpoint saved at step %d, stopping", self.step)
                        break
        finally:
            monitor.close()
        trained_steps = self.step - first_step
        summary = {
            **self._info(),
            "interrupted": interrupted,
            "train": train_metrics,
            "valid": val_metrics,
            "seconds": round(seconds, 3),
            "tokens_per_s": trained_steps * cfg.tokens_per_step / seconds if seconds else None,
        }
        summary.pop("signature")
        if not interrupted:
            summary["checkpoint"] = str(self.output_dir / FINAL_DIR)
            checkpoint.save_checkpoint(self.export_model, self.output_dir / FINAL_DIR, self.tokenizer,
                                       metadata={**self.metadata, "result": summary})
        return summary
