"""minitron prune: importance on calibration data, then width/depth pruning of a checkpoint.

Writes OUTPUT/ = a normal checkpoint of the pruned model, plus importance.pt (the teacher's scores,
reused by later prunes of the same teacher: `importance_from=OUTPUT`, or automatically when
OUTPUT/importance.pt was computed with the same settings), report.json, report.md and plots.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import timed, torch_dtype
from nemo_minitron.importance import (
    Aggregation,
    ImportanceScores,
    contiguous_block_scores,
    estimate_importance,
    layer_loss_scores,
    loss_metric,
    magnitude_scores,
    random_scores,
    sample_windows,
)
from nemo_minitron.importance.scores import FILE_NAME, METHODS
from nemo_minitron.models import bridge
from nemo_minitron.prune import PruneSpec, best_block, lowest_layers, plan, prune_model, select_indices
from nemo_minitron.prune.indices import DEPTH_METHODS
from nemo_minitron.prune.report import write_report

log = logging.getLogger("nemo_minitron")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _calibration_path(cfg) -> Path:
    """calib.data, or the corpus calib split (built once, on rank 0)."""
    if cfg.calib.data is not None:
        path = Path(cfg.calib.data)
        if not path.exists():
            raise FileNotFoundError(f"calib.data={path} does not exist")
        return path
    from nemo_minitron.data.corpus import build_corpus, default_cache_dir

    c = cfg.corpus
    out = Path(c.output_dir) if c.output_dir else Path(c.cache_dir or default_cache_dir()) / "splits"
    if parallel.is_main_process():
        log.info("calib.data not set: building the corpus calibration split under %s", out)
        build_corpus(out, sources=list(c.sources), cache_dir=c.cache_dir, seed=c.seed,
                     heldout_fraction=c.heldout_fraction, calib_fraction=c.calib_fraction)
    _barrier()
    return out / "calib.jsonl"


class _Calibration:
    """Calibration windows, read and tokenized only if some step needs them."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    @cache
    def stream(self) -> np.ndarray:
        from nemo_minitron.data.indexed import load_token_stream

        return load_token_stream(_calibration_path(self.cfg), self.tokenizer, self.cfg.calib.text_key)

    def windows(self) -> torch.Tensor:
        c = self.cfg.calib
        return sample_windows(self.stream(), c.seq_len, c.num_samples, c.seed)

    @cache
    def loss_windows(self) -> torch.Tensor:
        # A separate draw: the chosen calibration windows are in stream order, so their first
        # rows would all come from the first source of the corpus.
        c = self.cfg.calib
        return sample_windows(self.stream(), c.seq_len, self.cfg.loss_samples, c.seed + 1)

    def metric(self):
        return loss_metric(self.loss_windows(), self.cfg.calib.micro_batch_size)


def _request(cfg) -> dict:
    """What the scores depend on; saved scores are reused only when it matches."""
    activation = cfg.importance == "activation"
    calib = OmegaConf.to_container(cfg.calib)
    calib.pop("micro_batch_size")
    if calib["data"] is not None:
        calib["data"] = str(Path(calib["data"]).absolute())
    else:
        calib["corpus"] = OmegaConf.to_container(cfg.corpus)
    return {
        "teacher": str(Path(cfg.checkpoint).absolute()),
        "method": cfg.importance,
        "aggregation": OmegaConf.to_container(cfg.aggregation) if activation else None,
        "calib": calib if activation else None,
        "seed": cfg.seed if cfg.importance == "random" else None,
        "loss_samples": cfg.loss_samples,
    }


def _cached_scores(cfg, teacher, request) -> ImportanceScores | None:
    if cfg.importance_from:
        scores = ImportanceScores.load(cfg.importance_from, teacher)
        if scores.method != cfg.importance:
            raise ValueError(f"importance_from={cfg.importance_from} holds {scores.method} scores, "
                             f"but importance={cfg.importance}")
        return scores
    existing = Path(cfg.output_dir) / FILE_NAME
    if existing.is_file():
        scores = ImportanceScores.load(existing)
        if scores.arch == teacher and scores.info.get("request") == request:
            return scores
        log.info("%s was computed with other settings: recomputing", existing)
    return None


def _importance(cfg, model, teacher, calibration: _Calibration, request) -> tuple[ImportanceScores, bool]:
    """(scores, reused?)"""
    scores = _cached_scores(cfg, teacher, request)
    if scores is not None:
        log.info("importance: reusing saved %s scores", scores.method)
        return scores, True
    if cfg.importance == "activation":
        agg = Aggregation(**cfg.aggregation)
        scores = estimate_importance(model, calibration.windows(), agg, cfg.calib.micro_batch_size)
    elif cfg.importance == "magnitude":
        scores = magnitude_scores(teacher, bridge.gather_global(model))
    else:
        scores = random_scores(teacher, cfg.seed)
    scores.info["request"] = request
    return scores, False


def _dropped_layers(
    cfg, spec: PruneSpec, teacher, model, scores: ImportanceScores, calibration: _Calibration
) -> list[int]:
    """Which layers go; depth scores computed here are added to `scores` (and so saved)."""
    if spec.drop_layers is not None:
        return sorted(spec.drop_layers)
    k = spec.num_dropped(teacher)
    if k == 0:
        return []
    method = cfg.depth.method
    if method == "contiguous":
        if k not in scores.blocks:
            scores.blocks[k] = contiguous_block_scores(model, k, calibration.metric())
        return best_block(scores.blocks[k], k)
    if method not in scores.layers:
        if method == "loss":
            scores.layers["loss"], _ = layer_loss_scores(model, calibration.metric())
        elif method == "magnitude":
            scores.layers["magnitude"] = magnitude_scores(teacher, bridge.gather_global(model)).layers["magnitude"]
        elif method == "random":
            scores.layers["random"] = random_scores(teacher, cfg.seed).layers["random"]
        else:
            raise ValueError(f"depth.method={method} needs activation scores: set importance=activation")
    return lowest_layers(scores.layers[method], k)


def _check_choices(cfg) -> None:
    if cfg.importance not in METHODS:
        raise ValueError(f"importance={cfg.importance} is not one of {list(METHODS)}")
    if cfg.depth.method not in DEPTH_METHODS:
        raise ValueError(f"depth.method={cfg.depth.method} is not one of {list(DEPTH_METHODS)}")
    Aggregation(**cfg.aggregation)
    for key in ("num_samples", "seq_len", "micro_batch_size"):
        if cfg.calib[key] < 1:
            raise ValueError(f"calib.{key}={cfg.calib[key]} must be positive")


def run(cfg) -> dict:
    times: dict[str, float] = {}
    _check_choices(cfg)
    teacher = checkpoint.read_arch(cfg.checkpoint)
    spec = PruneSpec.from_dict(OmegaConf.to_container(cfg.target))
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    teacher.check_parallel(layout.tp, layout.pp)
    target = spec.target_arch(teacher, layout.tp, layout.pp)
    architecture = plan(teacher, spec, layout.tp, layout.pp)
    if cfg.plan_only:
        return architecture
    output = Path(cfg.output_dir).absolute()
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=torch_dtype(cfg.dtype))
    calibration = _Calibration(cfg, tokenizer)
    request = _request(cfg)
    with timed(times, "importance_s"):
        scores, reused = _importance(cfg, model, teacher, calibration, request)
    with timed(times, "depth_s"):
        dropped = _dropped_layers(cfg, spec, teacher, model, scores, calibration)
    student = {k: v for k, v in architecture["student"].items() if k != "parameters"}
    log.info("pruning to %s; dropping layers %s", student, dropped)
    indices = select_indices(scores, teacher, target, dropped)
    loss = None
    if cfg.report_loss:
        loss = {"windows": len(calibration.loss_windows()), "teacher": calibration.metric()(model)}
    with timed(times, "prune_s"):
        pruned = prune_model(model, target, indices, cfg.head_residual)
    del model
    if loss is not None:
        loss["pruned"] = calibration.metric()(pruned)
    depth_method = "explicit" if spec.drop_layers is not None else cfg.depth.method
    metadata = {"stage": "prune", "teacher": str(Path(cfg.checkpoint).absolute()), "target": spec.as_dict(),
                "dropped_layers": dropped, "importance": scores.method, "depth_method": depth_method,
                "head_residual": cfg.head_residual}
    with timed(times, "save_s"):
        checkpoint.save_checkpoint(pruned, output, tokenizer, metadata=metadata)
    report = {
        "teacher": metadata["teacher"], "output": str(output), "tp": layout.tp, "pp": layout.pp,
        "target": spec.as_dict(), "architecture": architecture,
        "importance": {"method": scores.method, "reused": reused, "head_residual": cfg.head_residual,
                       **{k: v for k, v in scores.info.items() if k != "request"}},
        "depth": {"method": depth_method, "dropped_layers": dropped,
                  "layer_scores": {k: v.tolist() for k, v in scores.layers.items()},
                  "block_losses": {str(k): v.tolist() for k, v in scores.blocks.items()}},
        "seconds": times,
    }
    if loss is not None:
        report["loss"] = loss
    files = {}
    if parallel.is_main_process():
        scores.save(output / FILE_NAME)
        files = write_report(output, report, scores, indices)
    _barrier()
    log.info("wrote %s", output)
    return {"checkpoint": str(output), "parameters": architecture["student"]["parameters"],
            "teacher_parameters": architecture["teacher"]["parameters"], "dropped_layers": dropped,
            "importance": report["importance"], **({"loss": loss} if loss else {}), "report": files, **times}
