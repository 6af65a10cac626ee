"""The main job, stage by stage, resumable.

import -> corpus -> [teacher-correct] -> prune (or search) -> distill -> [align] -> export-hf
[-> export-megatron] [-> export-nemo] -> evaluate.
Every stage is the same library function its own command calls, on the pipeline's settings for it
with the paths under `work_dir` and the pipeline's layout, seed and `overwrite`. A stage whose
output is complete with the same settings returns at once, so re-running resumes where the last run
stopped; one whose settings changed refuses (naming the keys) unless `overwrite=true`.

Precision: `dtype=null` (the default) leaves each stage its own, so the training stages run bf16
mixed precision where the device computes bf16 natively (`dtype: auto` in their configs) while
import, prune, export and evaluation stay fp32 (one perplexity per checkpoint, the one transformers
computes). A stage block's `dtype` changes one stage (`eval.dtype=bfloat16`,
`+distill.dtype=float32`); a top-level `dtype=NAME` runs every stage in it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nemo_minitron import checkpoint, parallel
from nemo_minitron.align.stage import AlignConfig, align_checkpoint
from nemo_minitron.convert import (ExportHFConfig, ExportMegatronConfig, ExportNeMoConfig, ImportConfig, export_hf,
                                   export_megatron, export_nemo, import_checkpoint)
from nemo_minitron.distill.stage import DistillConfig, TeacherCorrectConfig, correct_teacher, distill_checkpoint
from nemo_minitron.errors import UserError
from nemo_minitron.eval.stage import EvalConfig, HarnessConfig, evaluate_checkpoint
from nemo_minitron.models import nemo2
from nemo_minitron.outputs import claim_output, releases_output_locks
from nemo_minitron.pipeline.report import table, write_report
from nemo_minitron.pruning.stage import PruneConfig, prune_checkpoint
from nemo_minitron.search import stage as search_stage
from nemo_minitron.search.stage import SearchConfig, search_architecture
from nemo_minitron.stage import CorpusConfig, StageConfig, check_ranges
from nemo_minitron.train import stage as train_stage
from nemo_minitron.train.config import DataConfig

log = logging.getLogger("nemo_minitron")


@dataclass
class TeacherSource:
    """Where the teacher comes from: the source keys of `ImportConfig`."""

    model: str | None = "smollm2-135m"    # a built-in model, used when no path is set
    hf_path: str | None = None
    megatron_path: str | None = None      # a Megatron-LM --save directory
    iteration: int | None = None          # its save; None: the latest
    nemo_path: str | None = None          # a NeMo 2 checkpoint directory
    tokenizer: str | None = None          # the HF tokenizer of a Megatron-LM or NeMo 2 teacher

    @property
    def paths(self) -> list[str | None]:
        return [self.hf_path, self.megatron_path, self.nemo_path, self.tokenizer]


@dataclass
class ExportTargets:
    """Formats the student is written in besides Hugging Face (work_dir/student_hf)."""

    megatron: bool = False   # work_dir/student_megatron: Megatron-LM --load directory + flags
    nemo: bool = False       # work_dir/student_nemo: NeMo 2 checkpoint (needs NeMo 2 importable)


@dataclass
class OptionalStages:
    teacher_correct: bool = False
    search: bool = False    # the best architecture under search.budget replaces prune.target
    align: bool = False


@dataclass
class PipelineConfig(StageConfig):
    work_dir: str = "runs/smollm2-135m"
    teacher: TeacherSource = field(default_factory=TeacherSource)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    enabled: OptionalStages = field(default_factory=OptionalStages)
    teacher_correct: TeacherCorrectConfig = field(default_factory=TeacherCorrectConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    export: ExportTargets = field(default_factory=ExportTargets)
    eval: EvalConfig = field(default_factory=EvalConfig)   # held-out perplexity settings
    dtype: str | None = None   # None: each stage its own (see the module docstring); a name: every stage

    def __post_init__(self) -> None:
        if self.dtype is None:
            check_ranges(self)
        else:
            super().__post_init__()

    def check_inputs(self) -> None:
        """The recipes leave the teacher and the data to the user; say which key is missing. A job
        that ends in a NeMo 2 export checks for NeMo before it starts, not after distillation."""
        if not self.teacher.model and not any(self.teacher.paths[:3]):
            raise UserError("no teacher: set teacher.hf_path=DIR (a Hugging Face model directory), "
                            "teacher.megatron_path=DIR, teacher.nemo_path=DIR or teacher.model=smollm2-135m")
        if not self.corpus.sources and not self.corpus.user_paths:
            raise UserError("no distillation data: set corpus.user_paths=[FILE_OR_DIR,...] (.jsonl/.txt) or "
                            "corpus.sources=[...]")
        if self.export.nemo:
            nemo2.require_nemo()


class StageInterrupted(Exception):
    """A training stage saved a checkpoint on a pre-emption signal and returned before finishing."""


class Stages:
    """Runs stages in order and times them. Stage times of an earlier, interrupted run of the same
    work_dir are kept for the stages that found their output complete this time, so the final table
    covers the whole job."""

    def __init__(self, work: Path):
        previous = work / "results.json"
        self.seconds: dict[str, float] = (
            json.loads(previous.read_text()).get("stage_seconds", {}) if previous.is_file() else {}
        )
        self.results: dict[str, Any] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> None:
        log.info("=== stage %s ===", name)
        start = time.perf_counter()
        result = self.results[name] = fn()
        if isinstance(result, dict) and result.get("interrupted"):
            raise StageInterrupted(name)
        if isinstance(result, dict) and result.get("already_complete"):
            log.info("stage %s: output complete, skipped", name)
            return
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


@releases_output_locks
def run_pipeline(cfg: PipelineConfig) -> dict:
    """The whole job under `cfg.work_dir`; a re-run resumes. Returns the summary (also written as
    results.json and report.md), or {"status": "interrupted"} after a pre-emption checkpoint."""
    cfg.check_inputs()
    try:
        return _run_stages(cfg)
    except StageInterrupted as stop:
        # The launcher requeues the job; the re-run resumes this stage from its checkpoint.
        log.info("stage %s stopped on a pre-emption signal after saving a checkpoint: re-run to resume", stop)
        return {"status": "interrupted", "interrupted": True, "stage": str(stop),
                "work_dir": str(Path(cfg.work_dir).absolute())}


def check_stages(cfg: PipelineConfig, layout: parallel.ParallelLayout) -> None:
    """Every stage's settings that can be checked without its inputs, before the first stage runs:
    a mistake in a late block stops the job at once, naming the block, not after the teacher's
    import, the corpus and the pruning have run."""
    checks: dict[str, Callable[[], None]] = {}
    if cfg.enabled.search:
        checks["search"] = lambda: search_stage.check_settings(cfg.search, layout)
    else:
        checks["prune"] = cfg.prune.validate
    if cfg.enabled.teacher_correct:
        checks["teacher_correct"] = lambda: train_stage.check_settings(cfg.teacher_correct.with_schedule(), layout)
    checks["distill"] = lambda: train_stage.check_settings(cfg.distill, layout)
    if cfg.enabled.align:
        checks["align"] = lambda: train_stage.check_settings(cfg.align, layout)
    for block, check in checks.items():
        try:
            check()
        except UserError as err:
            raise UserError(f"the {block} block ({block}.* keys): {err}") from None


def _run_stages(cfg: PipelineConfig) -> dict:
    check_stages(cfg, parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep))
    work = claim_output(cfg.work_dir, "pipeline", [*cfg.teacher.paths, *cfg.corpus.user_paths], key="work_dir")
    common = {"tp": cfg.tp, "pp": cfg.pp, "ep": cfg.ep, "seed": cfg.seed, "overwrite": cfg.overwrite,
              **({"dtype": cfg.dtype} if cfg.dtype else {})}
    stages = Stages(work)

    teacher = work / "teacher"
    stages.run("import", lambda: import_checkpoint(ImportConfig(
        **dataclasses.asdict(cfg.teacher), output_dir=str(teacher), **common)))

    splits: dict[str, Path] = {}
    corpus = cfg.corpus if cfg.corpus.output_dir else dataclasses.replace(cfg.corpus, output_dir=str(work / "corpus"))
    stages.run("corpus", lambda: splits.update(corpus.splits()))
    data = DataConfig(train=str(splits["train"]), valid=str(splits["heldout"]))

    if cfg.enabled.teacher_correct:
        corrected = work / "teacher_corrected"
        stages.run("teacher_correct", lambda: correct_teacher(
            dataclasses.replace(cfg.teacher_correct, teacher=str(teacher), output_dir=str(corrected), data=data,
                                **common)))
        teacher = corrected / "final"

    prune = dataclasses.replace(cfg.prune, calib=dataclasses.replace(cfg.prune.calib, data=str(splits["calib"])))
    if cfg.enabled.search:
        pruned = work / "search" / "winner"
        search = dataclasses.replace(
            cfg.search, checkpoint=str(teacher), output_dir=str(pruned.parent),
            prune=dataclasses.replace(cfg.search.prune, calib=dataclasses.replace(
                cfg.search.prune.calib, data=str(splits["calib"]))),
            distill=dataclasses.replace(cfg.search.distill, data=data), **common)
        stages.run("search", lambda: search_architecture(search))
    else:
        pruned = work / "pruned"
        stages.run("prune", lambda: prune_checkpoint(dataclasses.replace(
            prune, checkpoint=str(teacher), output_dir=str(pruned), **common)))

    distilled = work / "distill"
    distill = dataclasses.replace(cfg.distill, teacher=str(teacher), student=str(pruned), output_dir=str(distilled),
                                  data=data, **common)
    stages.run("distill", lambda: distill_checkpoint(distill))
    student = distilled / "final"

    if cfg.enabled.align:
        aligned = work / "align"
        stages.run("align", lambda: align_checkpoint(dataclasses.replace(
            cfg.align, checkpoint=str(student), output_dir=str(aligned),
            builtin=dataclasses.replace(cfg.align.builtin, cache_dir=str(work / "align_data")), **common)))
        student = aligned / "final"

    hf_dir = work / "student_hf"
    stages.run("export_hf", lambda: export_hf(ExportHFConfig(
        checkpoint=str(student), output_dir=str(hf_dir), **common)))
    if cfg.export.megatron:
        stages.run("export_megatron", lambda: export_megatron(ExportMegatronConfig(
            checkpoint=str(student), output_dir=str(work / "student_megatron"), **common)))
    if cfg.export.nemo:
        stages.run("export_nemo", lambda: export_nemo(ExportNeMoConfig(
            checkpoint=str(student), output_dir=str(work / "student_nemo"), **common)))

    perplexity: dict[str, dict] = {}
    for label, ckpt in (("teacher", teacher), ("pruned", pruned), ("student", student)):
        evaluation = dataclasses.replace(cfg.eval, checkpoint=str(ckpt), data=str(splits["heldout"]),
                                         harness=HarnessConfig(), **common)
        stages.run(f"eval_{label}", lambda evaluation=evaluation, label=label: perplexity.__setitem__(
            label, evaluate_checkpoint(evaluation)))

    summary = _summary(work, teacher, pruned, student, perplexity, stages, splits)
    summary["dtype"] = {"distill": distill.dtype, "eval": perplexity["student"]["dtype"]}
    if parallel.is_main_process():
        (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_report(work, summary)
        print(table(summary), flush=True)
    return summary


def _tokens_used(path: Path) -> int:
    meta = checkpoint.read_metadata(path) if checkpoint.is_complete(path) else {}
    return int(meta.get("result", {}).get("tokens", 0))


def _summary(work: Path, teacher: Path, pruned: Path, student: Path, perplexity: dict, stages: Stages,
             splits: dict[str, Path]) -> dict:
    teacher_arch, student_arch = checkpoint.read_arch(teacher), checkpoint.read_arch(student)
    return {
        "work_dir": str(work),
        "corpus": {name: str(path) for name, path in splits.items()},
        "teacher": {"checkpoint": str(teacher), "parameters": teacher_arch.num_parameters(),
                    "heldout_perplexity": perplexity["teacher"]["perplexity"]},
        "pruned": {"checkpoint": str(pruned), "heldout_perplexity": perplexity["pruned"]["perplexity"]},
        "student": {"checkpoint": str(student), "hf_dir": str(work / "student_hf"),
                    **{f"{kind}_dir": str(work / f"student_{kind}") for kind in ("megatron", "nemo")
                       if (work / f"student_{kind}").is_dir()},
                    "parameters": student_arch.num_parameters(), "architecture": student_arch.shape(),
                    "heldout_perplexity": perplexity["student"]["perplexity"]},
        "eval": {k: perplexity["student"][k] for k in ("tokens", "seq_len")},
        "distillation_tokens": _tokens_used(work / "distill" / "final"),
        "stage_seconds": stages.seconds,
    }
