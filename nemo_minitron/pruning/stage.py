"""The prune stage: importance on calibration data, then width/depth pruning of a checkpoint.

Writes OUTPUT/ = a normal checkpoint of the pruned model, plus importance.pt (the teacher's scores),
report.json, report.md and plots. Scores are reused, not recomputed, from `importance_from=DIR`, from
OUTPUT/importance.pt, or from the scores cache (`importance/cache.py`), under a key of what they
depend on (`_request`: the teacher's content id, the method, the aggregation, the calibration
windows and the depth-scoring samples); `scores_cache=false` turns it off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import ClassVar
from functools import cache
from pathlib import Path

import numpy as np
import torch

from nemo_minitron import checkpoint, parallel
from nemo_minitron.errors import UserError
from nemo_minitron.importance import (
    Aggregation,
    ImportanceScores,
    activation_loop,
    contiguous_block_scores,
    estimate_importance,
    estimate_taylor_importance,
    layer_loss_scores,
    loss_metric,
    magnitude_scores,
    random_scores,
    sample_windows,
)
from nemo_minitron.importance import cache as scores_cache
from nemo_minitron.importance.scores import EXPERT_METHODS, FILE_NAME, METHODS
from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.outputs import check_output, content_id, releases_output_locks, settings_of
from nemo_minitron.pruning.indices import DEPTH_METHODS, check_depth_method, choose_dropped_layers, select_indices
from nemo_minitron.pruning.planner import plan
from nemo_minitron.pruning.reconstruct import check_options, record_statistics
from nemo_minitron.pruning.report import REPORT_FILES, write_report
from nemo_minitron.pruning.spec import PruneSpec
from nemo_minitron.pruning.surgery import prune_model
from nemo_minitron.stage_config import CorpusConfig, StageConfig, nested, timed

log = logging.getLogger("nemo_minitron")

# What the stage writes into its output directory (what overwrite=true may replace).
OUTPUT_ENTRIES = (*checkpoint.ENTRIES, FILE_NAME, *REPORT_FILES.values())


@dataclass
class CalibConfig:
    """The calibration windows: drawn from `data`, or from the corpus calib split."""

    data: str | None = None   # .txt/.jsonl file or directory; null: the corpus calib split (built below)
    text_key: str = "text"   # field holding the text in .jsonl files
    num_samples: int = 256    # calibration windows (paper: 1024; 256 is stable to 98% overlap, docs/pruning.md)
    seq_len: int = 256   # tokens per calibration window
    micro_batch_size: int = 4   # calibration windows per forward pass
    seed: int = 0   # which windows are drawn from the calibration text
    POSITIVE: ClassVar[tuple[str, ...]] = ("num_samples", "seq_len", "micro_batch_size")


@dataclass
class DepthConfig:
    method: str = "contiguous"   # contiguous (block search by loss) | loss | block_importance | magnitude | random


@dataclass
class ExpertsConfig:
    """How the routed experts of a mixture-of-experts teacher are ranked (`EXPERT_METHODS`)."""

    # output (router-weighted output norm) | frequency (tokens routed) | router_mass | magnitude | random
    method: str = "output"


@dataclass
class PruneConfig(StageConfig):
    checkpoint: str | None = None   # the teacher checkpoint to prune
    output_dir: str | None = None   # the pruned checkpoint, plus importance.pt, report.json, report.md and plots
    # null keeps the teacher's value; head_dim (kv_channels) never changes
    target: PruneSpec = nested(PruneSpec)
    # activation | taylor (first-order: |w x dLoss/dw| on the calib windows) | magnitude (weight norms) | random: width
    # ranking
    importance: str = "activation"
    importance_from: str | None = None   # a previous prune output (or its importance.pt) whose scores to reuse
    aggregation: Aggregation = nested(Aggregation)   # activation [s, b, c] -> per-channel score
    head_residual: bool = False   # fold pruned heads' output projections into kept heads of their group
    # refit linear_fc2 / linear_proj / a Mamba out_proj over the kept neurons / heads / channels to reproduce the teacher's
    # outputs on the calibration windows (ridge least squares, docs/pruning.md)
    reconstruct: bool = False
    # ridge towards the plain prune, relative to the mean activation energy (larger: closer to no refit)
    reconstruct_ridge: float = 1.0e-2
    # with reconstruct: the MLP before each dropped block also learns what the block added to the residual stream,
    # where that lowers the pruned model's LM loss on the loss_samples windows (each bridge checked)
    reconstruct_depth: bool = False
    # with reconstruct: calibration windows of the refit's statistics, a draw of their own (null: the importance's
    # calib windows; the refit's forward costs about as much as the importance's)
    reconstruct_samples: int | None = None
    depth: DepthConfig = nested(DepthConfig)
    experts: ExpertsConfig = nested(ExpertsConfig)  # MoE teachers: which routed experts each layer keeps
    calib: CalibConfig = nested(CalibConfig)
    # reuse this teacher's scores from an earlier prune with the same importance and calib settings (kept in
    # ~/.cache/nemo_minitron/importance, env NEMO_MINITRON_SCORES_CACHE)
    scores_cache: bool = True
    loss_samples: int = 32   # calibration windows for LM-loss scoring (depth.method=loss/contiguous, depth bridges, report)
    report_loss: bool = True   # calibration loss of the teacher and the pruned model in the report
    corpus: CorpusConfig = nested(CorpusConfig)   # used when calib.data is null
    plan_only: bool = False   # print architectures and parameter counts, touch no weights
    POSITIVE: ClassVar[tuple[str, ...]] = (*StageConfig.POSITIVE, "loss_samples", "reconstruct_samples")

    def validate(self) -> None:
        if self.importance not in METHODS:
            raise UserError(f"importance={self.importance} is not one of {list(METHODS)}")
        if self.depth.method not in DEPTH_METHODS:
            raise UserError(f"depth.method={self.depth.method} is not one of {list(DEPTH_METHODS)}")
        if self.experts.method not in EXPERT_METHODS:
            raise UserError(f"experts.method={self.experts.method} is not one of {list(EXPERT_METHODS)}")
        if self.reconstruct:
            check_options(self.reconstruct_ridge, self.head_residual)


def _calibration_path(cfg: PruneConfig) -> Path:
    """calib.data, or the corpus calib split (built once, on rank 0)."""
    if cfg.calib.data is not None:
        path = Path(cfg.calib.data)
        if not path.exists():
            raise UserError(f"calib.data={path} does not exist")
        return path
    log.info("calib.data not set: using the corpus calibration split")
    return cfg.corpus.splits()["calib"]


class _Calibration:
    """Calibration windows, read and tokenized only if some step needs them."""

    def __init__(self, cfg: PruneConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    @cache
    def stream(self) -> np.ndarray:
        from nemo_minitron.data.indexed import load_token_stream

        return load_token_stream(_calibration_path(self.cfg), self.tokenizer, self.cfg.calib.text_key)

    @cache
    def draw(self, count: int) -> torch.Tensor:
        """`count` calibration windows, seeded alike for every count: the importance's and the refit's
        draws are one draw when their counts are equal."""
        c = self.cfg.calib
        return sample_windows(self.stream(), c.seq_len, count, c.seed)

    def windows(self) -> torch.Tensor:
        return self.draw(self.cfg.calib.num_samples)

    def reconstruction_windows(self) -> torch.Tensor:
        return self.draw(self.cfg.reconstruct_samples or self.cfg.calib.num_samples)

    @cache
    def loss_windows(self) -> torch.Tensor:
        # A separate draw: the chosen calibration windows are in stream order, so their first
        # rows would all come from the first source of the corpus.
        c = self.cfg.calib
        return sample_windows(self.stream(), c.seq_len, self.cfg.loss_samples, c.seed + 1)

    def metric(self):
        return loss_metric(self.loss_windows(), self.cfg.calib.micro_batch_size)


def _data_identity(path: str) -> dict:
    """Which calibration data: its absolute path, size and modification time."""
    stat = Path(path).stat()
    return {"path": str(Path(path).absolute()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _request(cfg: PruneConfig) -> dict:
    """What the scores depend on; saved scores are reused only when it matches. The teacher is its
    content (a copy of it is the same teacher; a checkpoint rewritten in place is another)."""
    activation = cfg.importance == "activation"
    calibrated = cfg.importance in ("activation", "taylor")
    calib = dataclasses.asdict(cfg.calib)
    calib.pop("micro_batch_size")
    if calib["data"] is not None:
        calib["data"] = _data_identity(calib["data"])
    else:
        calib["corpus"] = dataclasses.asdict(cfg.corpus)
    return {
        "teacher": content_id(cfg.checkpoint) or str(Path(cfg.checkpoint).absolute()),
        "method": cfg.importance,
        "aggregation": cfg.aggregation.as_dict() if activation else None,
        "calib": calib if calibrated else None,
        "seed": cfg.seed if cfg.importance == "random" else None,
        "loss_samples": cfg.loss_samples,
    }


def _cached_scores(cfg: PruneConfig, teacher: ModelArch, request: dict) -> ImportanceScores | None:
    if cfg.importance_from:
        scores = ImportanceScores.load(cfg.importance_from, teacher)
        if scores.method != cfg.importance:
            raise UserError(f"importance_from={cfg.importance_from} holds {scores.method} scores, "
                            f"but importance={cfg.importance}")
        return scores
    existing = Path(cfg.output_dir) / FILE_NAME
    scores = scores_cache.matching(existing, teacher, request)
    if scores is not None:
        return scores
    if existing.is_file():
        log.info("%s was computed with other settings: recomputing", existing)
    return scores_cache.lookup(teacher, request) if cfg.scores_cache else None


def _importance(cfg: PruneConfig, model, teacher: ModelArch, calibration: _Calibration,
                request: dict) -> tuple[ImportanceScores, bool]:
    """(scores, reused?)"""
    scores = _cached_scores(cfg, teacher, request)
    if scores is not None:
        log.info("importance: reusing saved %s scores", scores.method)
        return scores, True
    if cfg.importance == "activation":
        forward_loop = activation_loop(calibration.windows(), cfg.calib.micro_batch_size)
        scores = estimate_importance(model, forward_loop, cfg.aggregation)
    elif cfg.importance == "taylor":
        scores = estimate_taylor_importance(model, calibration.windows(), cfg.calib.micro_batch_size)
    elif cfg.importance == "magnitude":
        scores = magnitude_scores(teacher, bridge.gather_global(model))
    else:
        scores = random_scores(teacher, cfg.seed)
    scores.info["request"] = request
    return scores, False


def _dropped_layers(cfg: PruneConfig, spec: PruneSpec, teacher: ModelArch, model, scores: ImportanceScores,
                    calibration: _Calibration) -> list[int]:
    """Which layers go; depth scores computed here are added to `scores` (and so saved)."""
    if spec.drop_layers is not None:
        return sorted(spec.drop_layers)
    k = spec.num_dropped(teacher)
    method = cfg.depth.method
    per_kind = spec.dropped_per_kind(teacher)
    if k == 0:
        return []
    check_depth_method(method, per_kind)
    if method == "contiguous" and k not in scores.blocks:
        scores.blocks[k] = contiguous_block_scores(model, k, calibration.metric())
    elif method == "loss" and method not in scores.layers:
        scores.layers["loss"], _ = layer_loss_scores(model, calibration.metric())
    elif method == "magnitude" and method not in scores.layers:
        scores.layers["magnitude"] = magnitude_scores(teacher, bridge.gather_global(model)).layers["magnitude"]
    elif method == "random" and method not in scores.layers:
        scores.layers["random"] = random_scores(teacher, cfg.seed).layers["random"]
    elif method == "block_importance" and method not in scores.layers:
        raise UserError(f"depth.method={method} needs activation scores: set importance=activation")
    return choose_dropped_layers(scores, teacher, k, method, per_kind)


@releases_output_locks
def prune_checkpoint(cfg: PruneConfig) -> dict:
    """Prune `cfg.checkpoint` to `cfg.target` into `cfg.output_dir` (collective)."""
    cfg.require("checkpoint", "output_dir")
    cfg.validate()
    settings = settings_of(cfg, ignore=["plan_only", "scores_cache"], inputs=["checkpoint"])
    if not cfg.plan_only:
        out = check_output(cfg.output_dir, "prune", [cfg.checkpoint, cfg.calib.data], settings=settings,
                           overwrite=cfg.overwrite, own=OUTPUT_ENTRIES)
        if checkpoint.is_complete(out) and (out / REPORT_FILES["json"]).is_file() and not cfg.overwrite:
            log.info("%s already holds this prune: nothing to do", out)
            report = json.loads((out / REPORT_FILES["json"]).read_text())
            files = {kind: str(out / name) for kind, name in REPORT_FILES.items()}
            return {**_result(report, files, report["seconds"]), "already_complete": True}
    times: dict[str, float] = {}
    teacher = checkpoint.read_arch(cfg.checkpoint)
    teacher.check_positions(cfg.calib.seq_len, "calib.seq_len")
    reconstruct = cfg.reconstruct
    if reconstruct and teacher.is_moe:  # the pipeline's default is on: these still prune
        log.warning("reconstruct=true: reconstruction refits dense MLPs, attention and Mamba mixers, not mixtures of "
                    "experts; pruning this %s teacher without it", teacher.family)
        reconstruct = False
    spec = cfg.target
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    teacher.check_parallel(layout.tp, layout.pp, layout.ep)
    target = spec.target_arch(teacher, layout.tp, layout.pp, layout.ep)
    architecture = plan(teacher, spec, layout.tp, layout.pp, layout.ep)
    if cfg.plan_only:
        return architecture
    if spec.num_dropped(teacher) and spec.drop_layers is None:
        check_depth_method(cfg.depth.method, spec.dropped_per_kind(teacher))  # before the weights load
    output = Path(cfg.output_dir).absolute()
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    with timed(times, "load_s"):
        model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=cfg.torch_dtype)
    calibration = _Calibration(cfg, tokenizer)
    request = _request(cfg)
    with timed(times, "importance_s"):
        scores, reused = _importance(cfg, model, teacher, calibration, request)
    with timed(times, "depth_s"):
        dropped = _dropped_layers(cfg, spec, teacher, model, scores, calibration)
    target = spec.with_dropped(dropped).target_arch(teacher, layout.tp, layout.pp, layout.ep)  # a hybrid's pattern
    student = {k: v for k, v in architecture["student"].items() if k != "parameters"}
    log.info("pruning to %s; dropping layers %s", student, dropped)
    indices = select_indices(scores, teacher, target, dropped, cfg.experts.method)
    loss = None
    if cfg.report_loss:
        loss = {"windows": len(calibration.loss_windows()), "teacher": calibration.metric()(model)}
    reconstruction = None
    if reconstruct:
        with timed(times, "reconstruct_s"):
            forward_loop = activation_loop(calibration.reconstruction_windows(), cfg.calib.micro_batch_size,
                                           purpose="reconstruction")
            reconstruction = record_statistics(model, indices, forward_loop, cfg.reconstruct_ridge,
                                               bridge=cfg.reconstruct_depth)
    with timed(times, "prune_s"):
        pruned = prune_model(model, target, indices, cfg.head_residual, reconstruction,
                             bridge_loss=calibration.metric() if cfg.reconstruct_depth else None)
    del model
    if loss is not None:
        loss["pruned"] = calibration.metric()(pruned)
    depth_method = "explicit" if spec.drop_layers is not None else cfg.depth.method
    metadata = {"stage": "prune", "teacher": str(Path(cfg.checkpoint).absolute()), "target": spec.as_dict(),
                "dropped_layers": dropped, "importance": scores.method, "depth_method": depth_method,
                "head_residual": cfg.head_residual, "reconstruct": reconstruct, "settings": settings}
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
    if teacher.is_moe:
        report["experts"] = {"method": cfg.experts.method, "kept": {str(i): e.tolist() for i, e in indices.experts.items()},
                             "scores": {k: v.tolist() for k, v in scores.experts.items()}}
    if teacher.is_hybrid:
        report["mamba"] = {"kept_heads": {str(i): h.flatten().tolist() for i, h in indices.mamba_heads.items()},
                           "kept_channels": {str(i): c.tolist() for i, c in indices.mamba_channels.items()},
                           "pattern": {"teacher": teacher.hybrid_pattern, "student": target.hybrid_pattern}}
    if loss is not None:
        report["loss"] = loss
    if reconstruction is not None:
        report["reconstruction"] = {"ridge": cfg.reconstruct_ridge, "windows": len(calibration.reconstruction_windows()),
                                    "errors": reconstruction.errors}
        if reconstruction.bridge_checks is not None:
            report["reconstruction"]["bridges"] = {"windows": len(calibration.loss_windows()),
                                                   "checks": reconstruction.bridge_checks}
    files = {}
    if parallel.is_main_process():
        scores.save(output / FILE_NAME)
        if cfg.scores_cache and scores.info.get("request") == request:  # with any depth scores added here
            scores_cache.keep(scores, request)
        files = write_report(output, report, scores, indices)
    parallel.barrier()
    log.info("wrote %s", output)
    return _result(report, files, times)


def _result(report: dict, files: dict[str, str], times: dict[str, float]) -> dict:
    """The stage's JSON result, from its report."""
    architecture = report["architecture"]
    return {"checkpoint": report["output"], "parameters": architecture["student"]["parameters"],
            "teacher_parameters": architecture["teacher"]["parameters"],
            "dropped_layers": report["depth"]["dropped_layers"], "importance": report["importance"],
            **({"loss": report["loss"]} if "loss" in report else {}), "report": files, **times}
