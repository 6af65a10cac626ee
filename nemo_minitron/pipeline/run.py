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
`distill.dtype=float32`); a top-level `dtype=NAME` runs every stage in it.

`PipelineConfig()` is the main job: its blocks hold the main job's settings of each stage (as
`minitron pipeline` with no arguments runs it), and its layout, seed, `overwrite` and (when set)
`dtype` pass to every block when it is made.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

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
from nemo_minitron.stage_config import CorpusConfig, StageConfig, check_ranges, nested
from nemo_minitron.train import training_stage as train_stage
from nemo_minitron.train.config import DataConfig

log = logging.getLogger("nemo_minitron")


@dataclass
class TeacherSource:
    """Where the teacher comes from: the source keys of `ImportConfig`."""

    model: str | None = "smollm2-135m"    # built-in model, used when no path below is set
    hf_path: str | None = None   # a local Hugging Face model directory
    megatron_path: str | None = None      # a Megatron-LM run's --save directory (torch_dist)
    iteration: int | None = None          # its save; null: the one latest_checkpointed_iteration.txt names
    nemo_path: str | None = None          # a NeMo 2 checkpoint directory (context/ + weights/)
    tokenizer: str | None = None  # HF tokenizer directory of a Megatron-LM / NeMo 2 teacher; null: the one it records

    @property
    def paths(self) -> list[str | None]:
        return [self.hf_path, self.megatron_path, self.nemo_path, self.tokenizer]


@dataclass
class ExportTargets:
    """Formats the student is written in besides Hugging Face (work_dir/student_hf)."""

    megatron: bool = False   # work_dir/student_megatron: Megatron-LM --load directory + megatron_args.txt
    nemo: bool = False       # work_dir/student_nemo: NeMo 2 checkpoint (run where NeMo 2 is importable)


@dataclass
class OptionalStages:
    """The optional stages that run; on the command line each is its block's `enabled` key."""

    teacher_correct: bool = True   # fine-tune the teacher on the training split first, to distil from it
    search: bool = False    # search instead of pruning to prune.target (the best candidate under search.budget)
    align: bool = False     # align the distilled student before export


@dataclass
class PipelineConfig(StageConfig):
    work_dir: str = "runs/smollm2-135m"   # every stage's output, results.json and report.md go here
    # one source (the import stage's keys): a built-in model or one of the paths
    teacher: TeacherSource = nested(TeacherSource)
    corpus: CorpusConfig = nested(CorpusConfig)
    enabled: OptionalStages = nested(OptionalStages)
    # after a teacher correction, the teacher pruned (or searched): imported (as the user brought it) | corrected;
    # the distillation always learns from the corrected one (docs/benchmarks.md, teacher correction first)
    prune_from: str = "imported"
    # fine-tune the teacher on the distillation data first (teacher-correct's keys): 12 steps of 8 x 256 tokens at
    # lr 2e-4 take the student's held-out perplexity from 1.76x the teacher's to 1.44-1.47x in the same 20 minutes
    # (docs/benchmarks.md, teacher correction in the main job)
    teacher_correct: TeacherCorrectConfig = nested(
        TeacherCorrectConfig, train={"steps": 12, "micro_batch_size": 2, "seq_length": 256},
        optim={"lr": 2.0e-4, "warmup_steps": 2})
    # optional: search the architecture under a budget instead of prune.target (search's keys); the budget is ~50%
    # of SmolLM2's 106M non-embedding parameters, the zero-shot scoring sized as prune below, each candidate's
    # retraining as distill below
    search: SearchConfig = nested(
        SearchConfig, budget={"non_embedding_params": 5.3e7},
        search={"max_candidates": 4, "top_k": 2, "retrain_steps": 20},
        prune={"calib": {"num_samples": 64}, "loss_samples": 8},
        distill={"train": {"micro_batch_size": 2, "seq_length": 256}})
    # ~50% of SmolLM2's non-embedding parameters: FFN halved, 6 layers dropped, the kept layers refit on 256
    # calibration windows (held-out perplexity 222 -> 64 before distillation, docs/benchmarks.md) (prune's keys)
    prune: PruneConfig = nested(
        PruneConfig, target={"ffn_hidden_size": 768, "num_layers": 24}, depth={"method": "contiguous"},
        reconstruct=True, reconstruct_depth=True, reconstruct_samples=256, calib={"num_samples": 64}, loss_samples=4)
    # 64 steps at lr 5e-4, so the job with its teacher correction keeps to 20 minutes with native bf16 and 30
    # without: the ablation and the recovery curves in docs/benchmarks.md (distill's keys)
    distill: DistillConfig = nested(
        DistillConfig, train={"steps": 64, "micro_batch_size": 2, "seq_length": 256, "log_interval": 4,
                              "save_interval": 16, "eval_batches": 1},
        optim={"lr": 5.0e-4, "min_lr": 5.0e-5, "warmup_steps": 4})
    # optional: align the distilled student (align's keys; method: sft | dpo | rpo | steerlm)
    align: AlignConfig = nested(AlignConfig, method="sft", train={"steps": 10, "seq_length": 176})
    # the student is always written as Hugging Face (work_dir/student_hf); also:
    export: ExportTargets = nested(ExportTargets)
    # the held-out perplexity of teacher, pruned model and student (eval's keys)
    eval: EvalConfig = nested(EvalConfig, max_tokens=8192)
    # null: each stage its own (training bf16 where native, else fp32; import, prune, eval, export fp32; a block's dtype
    # changes one: eval.dtype=bfloat16, distill.dtype=float32); a name: every stage
    dtype: str | None = None
    STAGE_BLOCKS: ClassVar[tuple[str, ...]] = ("teacher_correct", "search", "prune", "distill", "align", "eval")
    PRUNE_FROM: ClassVar[tuple[str, ...]] = ("imported", "corrected")

    def __post_init__(self) -> None:
        if self.prune_from not in self.PRUNE_FROM:
            raise UserError(f"prune_from={self.prune_from} is not one of {', '.join(self.PRUNE_FROM)}")
        if self.dtype is None:
            check_ranges(self)
        else:
            super().__post_init__()
        for name in self.STAGE_BLOCKS:
            setattr(self, name, dataclasses.replace(getattr(self, name), **self.stage_settings()))

    def stage_settings(self) -> dict[str, Any]:
        """What the pipeline hands every stage it runs: its layout, seed, `overwrite` and (when set)
        dtype."""
        return {**self.shared_settings(), "overwrite": self.overwrite}

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
    common = cfg.stage_settings()  # for the stages without a block
    stages = Stages(work)

    imported = teacher = work / "teacher"
    stages.run("import", lambda: import_checkpoint(ImportConfig(
        **dataclasses.asdict(cfg.teacher), output_dir=str(imported), **common)))

    splits: dict[str, Path] = {}
    corpus = cfg.corpus if cfg.corpus.output_dir else dataclasses.replace(cfg.corpus, output_dir=str(work / "corpus"))
    stages.run("corpus", lambda: splits.update(corpus.splits()))
    data = DataConfig(train=str(splits["train"]), valid=str(splits["heldout"]))

    if cfg.enabled.teacher_correct:
        corrected = work / "teacher_corrected"
        stages.run("teacher_correct", lambda: correct_teacher(
            dataclasses.replace(cfg.teacher_correct, teacher=str(teacher), output_dir=str(corrected), data=data)))
        teacher = corrected / "final"
    pruned_from = teacher if cfg.prune_from == "corrected" else imported

    prune = dataclasses.replace(cfg.prune, calib=dataclasses.replace(cfg.prune.calib, data=str(splits["calib"])))
    if cfg.enabled.search:
        pruned = work / "search" / "winner"
        search = dataclasses.replace(
            cfg.search, checkpoint=str(pruned_from), output_dir=str(pruned.parent),
            prune=dataclasses.replace(cfg.search.prune, calib=dataclasses.replace(
                cfg.search.prune.calib, data=str(splits["calib"]))),
            distill=dataclasses.replace(cfg.search.distill, data=data))
        stages.run("search", lambda: search_architecture(search))
    else:
        pruned = work / "pruned"
        stages.run("prune", lambda: prune_checkpoint(dataclasses.replace(
            prune, checkpoint=str(pruned_from), output_dir=str(pruned))))

    distilled = work / "distill"
    distill = dataclasses.replace(cfg.distill, teacher=str(teacher), student=str(pruned), output_dir=str(distilled),
                                  data=data)
    stages.run("distill", lambda: distill_checkpoint(distill))
    student = distilled / "final"

    if cfg.enabled.align:
        aligned = work / "align"
        stages.run("align", lambda: align_checkpoint(dataclasses.replace(
            cfg.align, student=str(student), output_dir=str(aligned),
            builtin=dataclasses.replace(cfg.align.builtin, cache_dir=str(work / "align_data")))))
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
    # after a correction the report shows the teacher the user brought as well as the one distilled from
    evaluated = [("teacher_uncorrected", imported)] if teacher != imported else []
    for label, ckpt in (*evaluated, ("teacher", teacher), ("pruned", pruned), ("student", student)):
        evaluation = dataclasses.replace(cfg.eval, checkpoint=str(ckpt), data=str(splits["heldout"]),
                                         harness=HarnessConfig())
        stages.run(f"eval_{label}", lambda evaluation=evaluation, label=label: perplexity.__setitem__(
            label, evaluate_checkpoint(evaluation)))

    summary = _summary(work, imported, teacher, pruned, student, perplexity, stages, splits)
    summary["dtype"] = {"distill": distill.dtype, "eval": perplexity["student"]["dtype"]}
    if parallel.is_main_process():
        (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_report(work, summary)
        print(table(summary), flush=True)
    return summary


def _tokens_used(path: Path) -> int:
    meta = checkpoint.read_metadata(path) if checkpoint.is_complete(path) else {}
    return int(meta.get("result", {}).get("tokens", 0))


def _summary(work: Path, imported: Path, teacher: Path, pruned: Path, student: Path, perplexity: dict,
             stages: Stages, splits: dict[str, Path]) -> dict:
    teacher_arch, student_arch = checkpoint.read_arch(teacher), checkpoint.read_arch(student)
    return {
        "work_dir": str(work),
        "corpus": {name: str(path) for name, path in splits.items()},
        "teacher": {"checkpoint": str(teacher), "parameters": teacher_arch.num_parameters(),
                    "heldout_perplexity": perplexity["teacher"]["perplexity"],
                    **({"uncorrected": {"checkpoint": str(imported),
                                        "heldout_perplexity": perplexity["teacher_uncorrected"]["perplexity"]}}
                       if "teacher_uncorrected" in perplexity else {})},
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
