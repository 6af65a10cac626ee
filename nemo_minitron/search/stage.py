"""The search stage: architecture search under a parameter or memory budget (docs/design.md
section 8).

Enumerate grid architectures within the budget, prune the teacher to each (the prune stage, reusing
one importance estimate) and score it by its zero-shot calibration loss, retrain the best `top_k`
briefly with distillation (the distill stage; one Slurm job each with search.launcher=slurm), rank
them by held-out loss and copy the winner's pruned checkpoint to OUTPUT/winner. Every finished
step is cached under OUTPUT/candidates/<name>/, so re-running resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from nemo_minitron import checkpoint, parallel
from nemo_minitron.distill.stage import DistillConfig, distill_checkpoint
from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch
from nemo_minitron.outputs import claim_output, publishing, releases_output_locks, settings_of
from nemo_minitron.pruning.spec import PruneSpec
from nemo_minitron.pruning.stage import PruneConfig, prune_checkpoint
from nemo_minitron.search.cache import CandidateCache
from nemo_minitron.search.report import REPORT_FILES, write_report
from nemo_minitron.search.space import Budget, SearchSpace, candidate_name, enumerate_candidates, spread, target_of
from nemo_minitron.stage_config import StageConfig, nested
from nemo_minitron.train import training_stage as train_stage

log = logging.getLogger("nemo_minitron")
LAUNCHERS = ("local", "slurm")
WINNER_DIR = "winner"
# Settings of how far and where a search runs, not of what it measures: its cached results stay
# valid when they change, so a re-run continues (e.g. with a larger top_k, or on Slurm).
_HOW_TO_RUN = [f"search.{key}" for key in ("top_k", "launcher", "sbatch_args", "sbatch_script", "dry_run",
                                           "stop_after", "list_only")]
# What the stage writes into its output directory (what overwrite=true may replace).
OUTPUT_ENTRIES = ("candidates", WINNER_DIR, f"{WINNER_DIR}.partial", *REPORT_FILES)
# launchers/ of a source checkout (the NGC container and `pip install -e .` have one)
_SOURCE_LAUNCHER = Path(__file__).resolve().parents[2] / "launchers" / "distill.sh"


@dataclass
class SearchSettings:
    space: SearchSpace = nested(SearchSpace)
    max_candidates: int = 16   # zero-shot scores at most this many, evenly spread over the budget window (0: all)
    top_k: int = 3   # retrain the best k by zero-shot loss
    retrain_steps: int = 100   # distillation steps per retrained candidate (paper: rankings settle by ~300)
    launcher: str = "local"   # local: retrain in turn in this process | slurm: one sbatch job per candidate
    sbatch_args: str = ""   # extra sbatch options, e.g. "--nodes=2 --time=08:00:00"
    sbatch_script: str | None = None   # the distill job script (null: launchers/distill.sh of the source checkout)
    dry_run: bool = False   # slurm: print the sbatch commands (and write candidates/<name>/retrain.sh) only
    stop_after: int | None = None  # stop after this many newly computed steps (zero-shot or retraining); re-run resumes
    list_only: bool = False   # print the candidates that fit the budget, touch no weights
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("max_candidates", "top_k", "retrain_steps", "stop_after")

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise UserError(f"search.launcher={self.launcher} is not one of {list(LAUNCHERS)}")
        if self.top_k and not self.retrain_steps:
            raise UserError("search.top_k > 0 needs search.retrain_steps > 0 (or set search.top_k=0)")


@dataclass
class SearchConfig(StageConfig):
    checkpoint: str | None = None   # the teacher checkpoint
    output_dir: str | None = None   # candidates/, the report and winner/ (the best candidate's pruned checkpoint)
    # a prune output (or importance.pt) of this teacher: skip the importance estimate
    importance_from: str | None = None
    # exactly one of params / non_embedding_params / active_params / memory_bytes
    budget: Budget = nested(Budget)
    search: SearchSettings = nested(SearchSettings)
    # the zero-shot pruning of each candidate (the prune stage's keys), depth from the activation scores
    # (depth.method=contiguous searches blocks per depth, slower)
    prune: PruneConfig = nested(PruneConfig, depth={"method": "block_importance"})
    # the retraining of each of the top_k candidates (the distill stage's keys; train.steps = search.retrain_steps,
    # warm-up null: a tenth of it)
    distill: DistillConfig = nested(DistillConfig, optim={"warmup_steps": None})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prune, self.distill = (dataclasses.replace(block, **self.shared_settings())
                                    for block in (self.prune, self.distill))


class _Progress:
    """Counts newly computed steps; `search.stop_after` ends the run early (resume later)."""

    def __init__(self, stop_after: int | None):
        self.stop_after, self.done = stop_after, 0

    def exhausted(self) -> bool:
        return self.stop_after is not None and self.done >= self.stop_after


def _zero_shot(cfg: SearchConfig, arch: ModelArch, cache: CandidateCache, importance_from: str | None) -> dict:
    name = candidate_name(arch)
    result = prune_checkpoint(dataclasses.replace(
        cfg.prune, checkpoint=str(Path(cfg.checkpoint).absolute()), output_dir=str(cache.dir(name) / "pruned"),
        target=PruneSpec(**target_of(arch)), importance_from=importance_from, report_loss=True, plan_only=False))
    record = {}
    if parallel.is_main_process():
        record = cache.update(name, zero_shot_loss=result["loss"]["pruned"], teacher_loss=result["loss"]["teacher"])
    parallel.barrier()
    return record


def _retraining_train(cfg: SearchConfig):
    return dataclasses.replace(cfg.distill.train, steps=cfg.search.retrain_steps)


def _retraining(cfg: SearchConfig, name: str, cache: CandidateCache) -> DistillConfig:
    return dataclasses.replace(
        cfg.distill, teacher=str(Path(cfg.checkpoint).absolute()), student=str(cache.dir(name) / "pruned"),
        output_dir=str(cache.dir(name) / "distill"), train=_retraining_train(cfg))


def check_settings(cfg: SearchConfig, layout: parallel.ParallelLayout) -> None:
    """The search's settings and its retraining's, before the first zero-shot prune, not after all of
    them (a pipeline calls it before its first stage)."""
    cfg.search.validate()
    cfg.budget.validate()
    if not cfg.search.top_k or cfg.search.list_only:
        return
    try:
        train_stage.check_settings(dataclasses.replace(cfg.distill, train=_retraining_train(cfg)), layout)
    except UserError as err:
        raise UserError(f"the retraining (distill.* keys, train.steps = search.retrain_steps="
                        f"{cfg.search.retrain_steps}): {err}") from None


def _retrain_local(cfg: SearchConfig, name: str, cache: CandidateCache) -> bool:
    """Retrain in this process; False when a pre-emption signal stopped it at a checkpoint."""
    result = distill_checkpoint(_retraining(cfg, name, cache))
    if result.get("interrupted"):
        return False
    _record_retrained(cache, name, result)
    return True


def _record_retrained(cache: CandidateCache, name: str, result: dict) -> None:
    if parallel.is_main_process():
        cache.update(name, retrained_loss=result["valid"]["val/lm_loss"],
                     retrained_perplexity=result.get("val_perplexity"), retrain_tokens=result.get("tokens"))
    parallel.barrier()


def _overrides(block: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra command-line overrides (key=value) for a nested settings dict."""
    out = []
    for key, value in block.items():
        if isinstance(value, dict):
            out += _overrides(value, f"{prefix}{key}.")
        elif value is None:
            out.append(f"{prefix}{key}=null")
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}={str(value).lower()}")
        elif isinstance(value, list):
            out.append(f"{prefix}{key}=[{','.join(map(str, value))}]")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def _sbatch_command(cfg: SearchConfig, name: str, cache: CandidateCache) -> list[str]:
    settings = dataclasses.asdict(_retraining(cfg, name, cache))
    for key in ("tp", "pp"):  # the launcher's own flags
        settings.pop(key)
    script = Path(cfg.search.sbatch_script) if cfg.search.sbatch_script else _SOURCE_LAUNCHER
    if not script.is_file():
        raise UserError(f"search.sbatch_script={script} does not exist: point it at launchers/distill.sh")
    return ["sbatch", f"--job-name=minitron-search-{name}", *shlex.split(cfg.search.sbatch_args or ""),
            str(script), "--tp", str(cfg.tp), "--pp", str(cfg.pp), *_overrides(settings)]


def _retrain_slurm(cfg: SearchConfig, name: str, cache: CandidateCache) -> str:
    """'done' (result recorded), 'pending' (a job runs) or 'submitted'."""
    finished = train_stage.finished(cache.dir(name) / "distill")
    if finished is not None:
        _record_retrained(cache, name, finished)
        return "done"
    record = cache.get(name)
    if record.get("job") and not cfg.search.dry_run:
        return "pending"
    command = _sbatch_command(cfg, name, cache)
    line = shlex.join(command)
    (cache.dir(name) / "retrain.sh").write_text(f"#!/bin/bash\n{line}\n")
    if cfg.search.dry_run:
        print(line, flush=True)
        return "submitted"
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    cache.update(name, job=out.strip().split()[-1], sbatch=line)
    log.info("%s: submitted %s", name, out.strip())
    return "submitted"


def _rows(chosen: list[ModelArch], cache: CandidateCache, budget: Budget) -> list[dict]:
    rows = []
    for arch in chosen:
        name = candidate_name(arch)
        record = cache.get(name)
        rows.append({"name": name, "arch": target_of(arch), "parameters": arch.num_parameters(),
                     "cost": budget.cost(arch), **{k: record.get(k) for k in (
                         "zero_shot_loss", "retrained_loss", "retrained_perplexity", "retrain_tokens")}})
    # Retrained candidates first, by retrained loss; the rest by zero-shot loss.
    rows.sort(key=lambda r: (r["retrained_loss"] is None, r["retrained_loss"] or r["zero_shot_loss"] or float("inf")))
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return rows


@releases_output_locks
def search_architecture(cfg: SearchConfig) -> dict:
    """Find the best architecture under `cfg.budget`; its pruned checkpoint lands in OUTPUT/winner."""
    cfg.require("checkpoint", "output_dir")
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    check_settings(cfg, layout)
    teacher = checkpoint.read_arch(cfg.checkpoint)
    budget = cfg.budget
    if not cfg.search.list_only:
        claim_output(cfg.output_dir, "search", [cfg.checkpoint, cfg.importance_from, cfg.prune.calib.data,
                                                cfg.distill.data.train, cfg.distill.data.valid],
                     settings=settings_of(cfg, ignore=_HOW_TO_RUN, inputs=["checkpoint"]),
                     overwrite=cfg.overwrite, own=OUTPUT_ENTRIES)
    teacher.check_parallel(layout.tp, layout.pp, layout.ep)
    found = enumerate_candidates(teacher, cfg.search.space, budget, layout.tp, layout.pp, layout.ep)
    if not found:
        raise UserError(f"no grid architecture has {budget.kind} within {budget.tolerance:.0%} of {budget.value:.4g} "
                        f"(teacher: {budget.cost(teacher):.4g}): change budget.* or search.space.*")
    chosen = spread(found, cfg.search.max_candidates)
    log.info("%d architectures fit the budget; scoring %d", len(found), len(chosen))
    if cfg.search.list_only:
        return {"enumerated": len(found), "candidates": [candidate_name(a) for a in chosen]}

    output = Path(cfg.output_dir).absolute()
    cache = CandidateCache(output)
    progress = _Progress(cfg.search.stop_after)
    partial = {"status": "stopped", "output_dir": str(output), "enumerated": len(found)}

    # Zero-shot: each prune reuses the scores the previous one saved (plus its depth scores).
    importance_from = cfg.importance_from
    for arch in chosen:
        name = candidate_name(arch)
        if "zero_shot_loss" not in cache.get(name) or not checkpoint.is_complete(cache.dir(name) / "pruned"):
            if progress.exhausted():
                return partial
            log.info("zero-shot: %s (%s parameters)", name, f"{arch.num_parameters()['total']:,}")
            _zero_shot(cfg, arch, cache, importance_from)
            progress.done += 1
        importance_from = str(cache.dir(name) / "pruned")

    by_zero_shot = sorted(_rows(chosen, cache, budget), key=lambda r: r["zero_shot_loss"])
    top = [r["name"] for r in by_zero_shot][: cfg.search.top_k]
    states = {}
    for name in top:
        if "retrained_loss" in cache.get(name):
            continue
        if progress.exhausted():
            return partial
        log.info("retraining %s for %d steps (%s)", name, cfg.search.retrain_steps, cfg.search.launcher)
        if cfg.search.launcher == "local":
            if not _retrain_local(cfg, name, cache):  # re-running resumes its distillation
                return {**partial, "status": "interrupted", "interrupted": True, "candidate": name}
        else:
            states[name] = _retrain_slurm(cfg, name, cache)
        progress.done += 1
    waiting = [n for n, s in states.items() if s != "done"]
    if waiting:
        return {**partial, "status": "retraining", "jobs": waiting,
                "note": "re-run the same command after the jobs finish to rank them"}

    rows = _rows(chosen, cache, budget)
    winner = rows[0]["name"]
    target = output / WINNER_DIR
    report = {
        "teacher": str(Path(cfg.checkpoint).absolute()), "teacher_parameters": teacher.num_parameters(),
        "budget": {"kind": budget.kind, "value": budget.value, "tolerance": budget.tolerance,
                   **({"memory_dtype": budget.memory_dtype, "memory_batch_size": budget.memory_batch_size,
                       "memory_seq_length": budget.memory_seq_length} if budget.kind == "memory_bytes" else {})},
        "enumerated": len(found), "retrain_steps": cfg.search.retrain_steps, "launcher": cfg.search.launcher,
        "winner": {"name": winner, "checkpoint": str(target), "arch": rows[0]["arch"],
                   "retrained": str(cache.dir(winner) / "distill" / "final") if rows[0]["retrained_loss"] else None},
        "candidates": rows,
    }
    files = {}
    if parallel.is_main_process():
        with publishing(target, collective=False) as partial:
            shutil.copytree(cache.dir(winner) / "pruned", partial, dirs_exist_ok=True)
        files = write_report(output, report)
    parallel.barrier()
    return {"status": "done", "winner": report["winner"], "enumerated": len(found), "scored": len(rows),
            "retrained": sum(r["retrained_loss"] is not None for r in rows), "report": files}
