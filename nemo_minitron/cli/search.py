"""minitron search: architecture search under a parameter or memory budget (DESIGN.md section 6).

Enumerate grid architectures within the budget, prune the teacher to each (the prune stage, reusing
one importance estimate) and score it by its zero-shot calibration loss, retrain the best `top_k`
briefly with distillation (the distill stage; one Slurm job each with search.launcher=slurm), rank
them by held-out loss and copy the winner's pruned checkpoint to OUTPUT/winner. Every finished
step is cached under OUTPUT/candidates/<name>/, so re-running resumes.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.main import conf_dir
from nemo_minitron.cli.pipeline import stage_config
from nemo_minitron.models.config import ModelArch
from nemo_minitron.search import AXES, Budget, CandidateCache, SearchSpace, candidate_name, enumerate_candidates, spread
from nemo_minitron.search.report import write_report
from nemo_minitron.search.space import target_of

log = logging.getLogger("nemo_minitron")
LAUNCHERS = ("local", "slurm")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _Progress:
    """Counts newly computed steps; `search.stop_after` ends the run early (resume later)."""

    def __init__(self, stop_after: int | None):
        self.stop_after, self.done = stop_after, 0

    def exhausted(self) -> bool:
        return self.stop_after is not None and self.done >= self.stop_after


def _flatten(block: dict[str, Any], prefix: str = "") -> list[str]:
    """Hydra command-line overrides for a nested block."""
    out = []
    for key, value in block.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}.")
        elif value is None:
            out.append(f"{prefix}{key}=null")
        elif isinstance(value, bool):
            out.append(f"{prefix}{key}={str(value).lower()}")
        elif isinstance(value, list):
            out.append(f"{prefix}{key}=[{','.join(map(str, value))}]")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def _zero_shot(cfg, arch: ModelArch, cache: CandidateCache, importance_from: str | None, common: dict) -> dict:
    from nemo_minitron.cli.prune import run as prune

    name = candidate_name(arch)
    result = prune(stage_config("prune", cfg.prune, checkpoint=str(Path(cfg.checkpoint).absolute()),
                                output_dir=str(cache.dir(name) / "pruned"), target=target_of(arch),
                                importance_from=importance_from, report_loss=True, plan_only=False, **common))
    record = {}
    if parallel.is_main_process():
        record = cache.update(name, zero_shot_loss=result["loss"]["pruned"], teacher_loss=result["loss"]["teacher"])
    _barrier()
    return record


def _distill_overrides(cfg, name: str, cache: CandidateCache, common: dict) -> dict[str, Any]:
    return {"teacher": str(Path(cfg.checkpoint).absolute()), "student": str(cache.dir(name) / "pruned"),
            "output_dir": str(cache.dir(name) / "distill"), "train": {"steps": cfg.search.retrain_steps}, **common}


def _retrain_local(cfg, name: str, cache: CandidateCache, common: dict) -> bool:
    """Retrain in this process; False when a pre-emption signal stopped it at a checkpoint."""
    from nemo_minitron.cli.distill import run as distill

    result = distill(stage_config("distill", cfg.distill, **_distill_overrides(cfg, name, cache, common)))
    if result.get("interrupted"):
        return False
    _record_retrained(cache, name, result)
    return True


def _record_retrained(cache: CandidateCache, name: str, result: dict) -> None:
    if parallel.is_main_process():
        cache.update(name, retrained_loss=result["valid"]["val/lm_loss"],
                     retrained_perplexity=result.get("val_perplexity"), retrain_tokens=result.get("tokens"))
    _barrier()


def _sbatch_command(cfg, name: str, cache: CandidateCache, common: dict) -> list[str]:
    block = OmegaConf.to_container(cfg.distill) if cfg.distill is not None else {}
    fixed = _distill_overrides(cfg, name, cache, {k: v for k, v in common.items() if k not in ("tp", "pp")})
    script = conf_dir().parent / "launchers" / "distill.sh"
    return ["sbatch", f"--job-name=minitron-search-{name}", *shlex.split(cfg.search.sbatch_args or ""),
            str(script), "--tp", str(cfg.tp), "--pp", str(cfg.pp),
            *_flatten(block), *_flatten(fixed)]


def _retrain_slurm(cfg, name: str, cache: CandidateCache, common: dict) -> str:
    """'done' (result recorded), 'pending' (a job runs) or 'submitted'."""
    from nemo_minitron.train import stage

    finished = stage.finished(cache.dir(name) / "distill")
    if finished is not None:
        _record_retrained(cache, name, finished)
        return "done"
    record = cache.get(name)
    if record.get("job") and not cfg.search.dry_run:
        return "pending"
    command = _sbatch_command(cfg, name, cache, common)
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
        rows.append({"name": name, "arch": {k: getattr(arch, k) for k in AXES}, "parameters": arch.num_parameters(),
                     "cost": budget.cost(arch), **{k: record.get(k) for k in (
                         "zero_shot_loss", "retrained_loss", "retrained_perplexity", "retrain_tokens")}})
    # Retrained candidates first, by retrained loss; the rest by zero-shot loss.
    rows.sort(key=lambda r: (r["retrained_loss"] is None, r["retrained_loss"] or r["zero_shot_loss"] or float("inf")))
    for i, row in enumerate(rows):
        row["rank"] = i + 1
    return rows


def _check(cfg) -> None:
    if cfg.search.launcher not in LAUNCHERS:
        raise ValueError(f"search.launcher={cfg.search.launcher} is not one of {list(LAUNCHERS)}")
    for key in ("top_k", "retrain_steps", "max_candidates"):
        if cfg.search[key] < 0:
            raise ValueError(f"search.{key}={cfg.search[key]} must not be negative")
    if cfg.search.top_k and not cfg.search.retrain_steps:
        raise ValueError("search.top_k > 0 needs search.retrain_steps > 0 (or set search.top_k=0)")


def run(cfg) -> dict:
    _check(cfg)
    teacher = checkpoint.read_arch(cfg.checkpoint)
    budget = Budget(**OmegaConf.to_container(cfg.budget))
    space = SearchSpace(**OmegaConf.to_container(cfg.search.space))
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    teacher.check_parallel(layout.tp, layout.pp)
    found = enumerate_candidates(teacher, space, budget, layout.tp, layout.pp)
    if not found:
        raise ValueError(f"no grid architecture has {budget.kind} within {budget.tolerance:.0%} of {budget.value:.4g} "
                         f"(teacher: {budget.cost(teacher):.4g}): change budget.* or search.space.*")
    chosen = spread(found, cfg.search.max_candidates)
    log.info("%d architectures fit the budget; scoring %d", len(found), len(chosen))
    if cfg.search.list_only:
        return {"enumerated": len(found), "candidates": [candidate_name(a) for a in chosen]}

    output = Path(cfg.output_dir).absolute()
    cache = CandidateCache(output)
    common = {"tp": cfg.tp, "pp": cfg.pp, "seed": cfg.seed, "dtype": cfg.dtype}
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
            _zero_shot(cfg, arch, cache, importance_from, common)
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
            if not _retrain_local(cfg, name, cache, common):  # re-running resumes its distillation
                return {**partial, "status": "interrupted", "interrupted": True, "candidate": name}
        else:
            states[name] = _retrain_slurm(cfg, name, cache, common)
        progress.done += 1
    waiting = [n for n, s in states.items() if s != "done"]
    if waiting:
        return {**partial, "status": "retraining", "jobs": waiting,
                "note": "re-run the same command after the jobs finish to rank them"}

    rows = _rows(chosen, cache, budget)
    winner = rows[0]["name"]
    target = output / "winner"
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
        partial_dir = output / "winner.partial"
        shutil.rmtree(partial_dir, ignore_errors=True)
        shutil.copytree(cache.dir(winner) / "pruned", partial_dir)
        checkpoint.replace_dir(partial_dir, target)
        files = write_report(output, report)
    _barrier()
    return {"status": "done", "winner": report["winner"], "enumerated": len(found), "scored": len(rows),
            "retrained": sum(r["retrained_loss"] is not None for r in rows), "report": files}
