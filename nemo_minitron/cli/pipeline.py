"""minitron pipeline: the main job, stage by stage, resumable.

import -> corpus -> [teacher-correct] -> prune (or search) -> distill -> [align] -> export-hf -> evaluate.
Every stage is the same code as its own command: the pipeline composes `conf/<stage>.yaml`, applies
the pipeline's block for that stage and the paths under `work_dir`, and calls the stage's `run`.
A stage whose output is complete is skipped, so re-running resumes where the last run stopped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from nemo_minitron import checkpoint, parallel

log = logging.getLogger("nemo_minitron")


def block_overrides(block: Any) -> dict:
    """A pipeline block as overrides of its stage's config: the block without its `enabled` switch."""
    settings = OmegaConf.to_container(block) if block is not None else {}
    return {k: v for k, v in settings.items() if k != "enabled"}


def stage_config(name: str, block: Any, **fixed: Any):
    """conf/<name>.yaml, then the pipeline's block for it, then the paths the pipeline sets."""
    from hydra import compose

    return OmegaConf.merge(compose(config_name=name), block_overrides(block), fixed)


def _module_run(name: str) -> Callable:
    import importlib

    from nemo_minitron.cli.main import STAGES

    return importlib.import_module(STAGES[name][0]).run


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class StageInterrupted(Exception):
    """A training stage saved a checkpoint on a pre-emption signal and returned before finishing."""


class Stages:
    """Runs stages in order, timing them and skipping finished ones. Stage times of an earlier,
    interrupted run of the same work_dir are kept, so the final table covers the whole job."""

    def __init__(self, work: Path):
        previous = work / "results.json"
        self.seconds: dict[str, float] = (
            json.loads(previous.read_text()).get("stage_seconds", {}) if previous.is_file() else {}
        )
        self.results: dict[str, Any] = {}

    def run(self, name: str, done: bool, fn: Callable[[], Any]) -> None:
        if done:
            log.info("stage %s: output complete, skipped", name)
            return
        log.info("=== stage %s ===", name)
        start = time.perf_counter()
        self.results[name] = fn()
        if isinstance(self.results[name], dict) and self.results[name].get("interrupted"):
            raise StageInterrupted(name)
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("stage %s done in %.1f s", name, self.seconds[name])


def _check_inputs(cfg) -> None:
    """The recipes leave the teacher and the data to the user; say which key is missing."""
    if not cfg.teacher.model and not cfg.teacher.hf_path:
        raise ValueError("no teacher: set teacher.hf_path=DIR (a Hugging Face model directory) or teacher.model=smollm2-135m")
    if not cfg.corpus.sources and not cfg.corpus.user_paths:
        raise ValueError("no distillation data: set corpus.user_paths=[FILE_OR_DIR,...] (.jsonl/.txt) or corpus.sources=[...]")


def run(cfg) -> dict:
    _check_inputs(cfg)
    try:
        return _run_stages(cfg)
    except StageInterrupted as stop:
        # The launcher requeues the job; the re-run resumes this stage from its checkpoint.
        log.info("stage %s stopped on a pre-emption signal after saving a checkpoint: re-run to resume", stop)
        return {"status": "interrupted", "stage": str(stop), "work_dir": str(Path(cfg.work_dir).absolute())}


def _run_stages(cfg) -> dict:
    work = Path(cfg.work_dir).absolute()
    common = {"tp": cfg.tp, "pp": cfg.pp, "seed": cfg.seed, "dtype": cfg.dtype}
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    stages = Stages(work)

    teacher = work / "teacher"
    stages.run("import", checkpoint.is_complete(teacher), lambda: _module_run("import")(stage_config(
        "import", None, model=cfg.teacher.model, hf_path=cfg.teacher.hf_path, output_dir=str(teacher), **common)))

    corpus = work / "corpus"
    c = cfg.corpus

    def build() -> dict:
        from nemo_minitron.data.corpus import build_corpus

        if parallel.is_main_process():  # idempotent: a matching manifest makes it a no-op
            build_corpus(corpus, sources=list(c.sources), cache_dir=c.cache_dir, seed=c.seed,
                         heldout_fraction=c.heldout_fraction, calib_fraction=c.calib_fraction,
                         user_paths=list(c.user_paths))
        _barrier()
        return {"dir": str(corpus)}

    stages.run("corpus", False, build)
    data = {"train": str(corpus / "train.jsonl"), "valid": str(corpus / "heldout.jsonl")}

    if cfg.teacher_correct.enabled:
        corrected = work / "teacher_corrected"
        stages.run("teacher_correct", checkpoint.is_complete(corrected / "final"),
                   lambda: _module_run("teacher-correct")(stage_config(
                       "teacher-correct", cfg.teacher_correct, teacher=str(teacher), output_dir=str(corrected),
                       data=data, **common)))
        teacher = corrected / "final"

    calib = {"calib": {"data": str(corpus / "calib.jsonl")}}
    if cfg.search.enabled:  # the best architecture under search.budget replaces prune.target
        pruned = work / "search" / "winner"
        stages.run("search", checkpoint.is_complete(pruned), lambda: _module_run("search")(stage_config(
            "search", cfg.search, checkpoint=str(teacher), output_dir=str(pruned.parent), prune=calib,
            distill={"data": data}, **common)))
    else:
        pruned = work / "pruned"
        stages.run("prune", checkpoint.is_complete(pruned), lambda: _module_run("prune")(stage_config(
            "prune", cfg.prune, checkpoint=str(teacher), output_dir=str(pruned), **calib, **common)))

    distilled = work / "distill"
    stages.run("distill", checkpoint.is_complete(distilled / "final"), lambda: _module_run("distill")(stage_config(
        "distill", cfg.distill, teacher=str(teacher), student=str(pruned), output_dir=str(distilled), data=data,
        **common)))
    student = distilled / "final"

    if cfg.align.enabled:
        aligned = work / "align"
        stages.run("align", checkpoint.is_complete(aligned / "final"), lambda: _module_run("align")(stage_config(
            "align", cfg.align, checkpoint=str(student), output_dir=str(aligned),
            builtin={"cache_dir": str(work / "align_data")}, **common)))
        student = aligned / "final"

    hf_dir = work / "student_hf"
    stages.run("export_hf", (hf_dir / "config.json").is_file(), lambda: _module_run("export-hf")(stage_config(
        "export-hf", None, checkpoint=str(student), output_dir=str(hf_dir), **common)))

    perplexity: dict[str, dict] = {}
    evaluate = _module_run("eval")
    for label, ckpt in (("teacher", teacher), ("pruned", pruned), ("student", student)):
        stages.run(f"eval_{label}", False, lambda ckpt=ckpt, label=label: perplexity.__setitem__(label, evaluate(
            stage_config("eval", None, checkpoint=str(ckpt), data=data["valid"], seq_len=cfg.eval.seq_len,
                         micro_batch_size=cfg.eval.micro_batch_size, max_tokens=cfg.eval.max_tokens, **common))))

    summary = _summary(work, teacher, pruned, student, perplexity, stages)
    if parallel.is_main_process():
        (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        _write_report(work, summary)
        print(_table(summary), flush=True)
    return summary


def _tokens_used(path: Path) -> int:
    meta = checkpoint.read_metadata(path) if checkpoint.is_complete(path) else {}
    return int(meta.get("result", {}).get("tokens", 0))


def _summary(work: Path, teacher: Path, pruned: Path, student: Path, perplexity: dict, stages: Stages) -> dict:
    teacher_arch, student_arch = checkpoint.read_arch(teacher), checkpoint.read_arch(student)
    return {
        "work_dir": str(work),
        "teacher": {"checkpoint": str(teacher), "parameters": teacher_arch.num_parameters(),
                    "heldout_perplexity": perplexity["teacher"]["perplexity"]},
        "pruned": {"checkpoint": str(pruned), "heldout_perplexity": perplexity["pruned"]["perplexity"]},
        "student": {"checkpoint": str(student), "hf_dir": str(work / "student_hf"),
                    "parameters": student_arch.num_parameters(),
                    "architecture": {k: getattr(student_arch, k) for k in (
                        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")},
                    "heldout_perplexity": perplexity["student"]["perplexity"]},
        "eval": {k: perplexity["student"][k] for k in ("tokens", "seq_len")},
        "distillation_tokens": _tokens_used(work / "distill" / "final"),
        "stage_seconds": stages.seconds,
    }


def _table(summary: dict) -> str:
    t, p, s = summary["teacher"], summary["pruned"], summary["student"]
    rows = [
        ("", "teacher", "student"),
        ("parameters (total)", f"{t['parameters']['total']:,}", f"{s['parameters']['total']:,}"),
        ("parameters (non-embedding)", f"{t['parameters']['non_embedding']:,}", f"{s['parameters']['non_embedding']:,}"),
        ("held-out perplexity", f"{t['heldout_perplexity']:.2f}", f"{s['heldout_perplexity']:.2f}"),
        ("  pruned, before distillation", "", f"{p['heldout_perplexity']:.2f}"),
        ("distillation tokens", "", f"{summary['distillation_tokens']:,}"),
        *[(f"stage {k} (s)", "", f"{v:.1f}") for k, v in summary["stage_seconds"].items()],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)


def _plot_distillation(metrics: Path, out: Path) -> bool:
    """The distill stage's metrics.jsonl per step: the objective, the student's LM loss on the
    training batches and, where validated, on held-out data (the last two are comparable)."""
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    series = [("train/loss", "-", "objective (distillation loss)"), ("train/lm_loss", "-", "student LM loss, train"),
              ("val/lm_loss", "o", "student LM loss, held-out")]
    points = {key: [(r["step"], r[key]) for r in rows if key in r] for key, _, _ in series}
    if not points["train/loss"]:
        return False
    fig, ax = plt.subplots(figsize=(5, 3))
    for key, style, label in series:
        if points[key]:
            ax.plot(*zip(*points[key]), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def _write_report(work: Path, summary: dict) -> None:
    """report.md: the final table, perplexity by stage as a plot, and the stages' own reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["teacher", "pruned", "student"]
    values = [summary[k]["heldout_perplexity"] for k in labels]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(labels, values, color=["#4c72b0", "#c44e52", "#55a868"])
    ax.set_ylabel(f"held-out perplexity (window {summary['eval']['seq_len']})")
    ax.set_yscale("log")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(work / "perplexity.png", dpi=100)
    plt.close(fig)
    lines = ["# nemo-minitron pipeline report", "", "```", _table(summary), "```", "",
             "![held-out perplexity](perplexity.png)", ""]
    if (work / "pruned" / "report.md").is_file():
        lines += ["## Pruning", "", "See [pruned/report.md](pruned/report.md).", "",
                  "![layer importance](pruned/layer_importance.png)", ""]
    if (work / "search" / "report.md").is_file():
        lines += ["## Architecture search", "", "See [search/report.md](search/report.md).", "",
                  "![loss vs parameters](search/loss_vs_params.png)", ""]
    metrics = work / "distill" / "metrics.jsonl"
    if metrics.is_file():
        lines += ["## Distillation", "", "Per-step metrics: distill/metrics.jsonl (TensorBoard: distill/tensorboard).", ""]
        if _plot_distillation(metrics, work / "distillation.png"):
            lines += ["![distillation loss](distillation.png)", ""]
    (work / "report.md").write_text("\n".join(lines))
