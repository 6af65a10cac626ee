"""What the loop reports: metrics gathered to rank 0, console lines, TensorBoard, a progress bar."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from nemo_minitron import parallel
from nemo_minitron.atomic import write_text

log = logging.getLogger("nemo_minitron")


def reduce_metrics(per_microbatch: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each metric over micro-batches and data-parallel replicas, known on every rank.

    Metrics exist on the last pipeline stage only; its data-parallel replicas average them, then
    it hands them to the other stages of its pipeline (collective).
    """
    from megatron.core import parallel_state as ps

    metrics: dict[str, float] = {}
    if per_microbatch:
        keys = sorted(per_microbatch[0])
        values = torch.stack([torch.stack([m[k].float() for m in per_microbatch]).mean() for k in keys])
        if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
            values = values.to(parallel.device())
            dist.all_reduce(values, group=ps.get_data_parallel_group())
            values /= ps.get_data_parallel_world_size()
        metrics = dict(zip(keys, values.tolist()))
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        box = [metrics]
        last = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())[-1]
        dist.broadcast_object_list(box, src=last, group=ps.get_pipeline_model_parallel_group())
        metrics = box[0]
    return metrics


class Monitor:
    """Console lines every `log_interval` steps, TensorBoard scalars and a JSON-lines file of metrics
    (rank 0). A run resumed at `first_step` first drops the file's rows of later steps (written by
    the interrupted run after its last checkpoint), so every step has one row."""

    def __init__(self, metrics_file: Path, tensorboard_dir: Path, total_steps: int, first_step: int,
                 progress_bar: bool = True):
        self.enabled = parallel.is_main_process()
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(tensorboard_dir), purge_step=first_step + 1)
        _drop_rows_after(Path(metrics_file), first_step)
        self.jsonl = Path(metrics_file).open("a")
        if progress_bar:
            # disable=None: only on a terminal (no carriage-return spam in Slurm logs); log lines are
            # routed through the bar meanwhile so they do not tear it.
            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", desc="training", dynamic_ncols=True,
                            disable=None)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def step(self, step: int, metrics: dict[str, float], console: bool) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{metrics[f'train/{k}']:.4g}" for k in ("loss", "lr") if f"train/{k}" in metrics},
                                 refresh=False)
        if console:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            log.info("step %d: %s", step, shown)

    def close(self) -> None:
        if self.enabled:
            if self.bar is not None:
                self.bar.close()
                self._redirect.__exit__(None, None, None)
            self.writer.close()
            self.jsonl.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Rewrite the metrics file `path` without its rows of steps after `step` (atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def _row_step(line: str) -> float:
    """The step of a metrics row; a torn last line (killed mid-write) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
