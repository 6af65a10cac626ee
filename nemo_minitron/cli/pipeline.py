"""minitron pipeline: the main job, stage by stage, resumable.

Stages so far: import the teacher -> build the corpus -> held-out perplexity of the teacher.
Each stage's output lives under `work_dir`; a complete output is reused, so re-running resumes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.data.corpus import build_corpus
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity, windows_from_stream

log = logging.getLogger("nemo_minitron")


def _import_teacher(cfg, out: Path) -> None:
    from nemo_minitron.cli.import_model import read_source
    from nemo_minitron.models import bridge
    from nemo_minitron.models.gpt import build_gpt_model

    dtype = torch_dtype(cfg.dtype)
    arch, hf_state, tokenizer, source = read_source(cfg.teacher.model, cfg.teacher.hf_path, dtype)
    model = build_gpt_model(arch, params_dtype=dtype)
    bridge.load_global(model, bridge.hf_to_global(arch, hf_state))
    checkpoint.save_checkpoint(model, out, tokenizer, metadata={"stage": "import", "source": source})


def _perplexity(cfg, ckpt: Path, heldout: Path) -> dict:
    tokenizer = checkpoint.load_tokenizer(ckpt)
    windows = windows_from_stream(load_token_stream(heldout, tokenizer), cfg.eval.seq_len, cfg.eval.max_tokens)
    model = checkpoint.load_checkpoint(ckpt, params_dtype=torch_dtype(cfg.dtype))
    return evaluate_perplexity(model, windows, cfg.eval.micro_batch_size).as_dict()


def run(cfg) -> dict:
    work = Path(cfg.work_dir).absolute()
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    stage_seconds: dict[str, float] = {}

    def stage(name: str, done: bool, fn) -> None:
        if done:
            log.info("stage %s: output exists, skipped", name)
            return
        log.info("stage %s ...", name)
        start = time.perf_counter()
        fn()
        stage_seconds[name] = round(time.perf_counter() - start, 1)
        log.info("stage %s done in %.1f s", name, stage_seconds[name])

    teacher = work / "teacher"
    stage("import", checkpoint.is_complete(teacher), lambda: _import_teacher(cfg, teacher))
    splits: dict[str, Path] = {}
    corpus_cfg = cfg.corpus
    # build_corpus itself skips work when its manifest matches; only rank 0 writes files.
    if parallel.is_main_process():
        stage("corpus", False, lambda: splits.update(build_corpus(
            work / "corpus", sources=list(corpus_cfg.sources), cache_dir=corpus_cfg.cache_dir,
            seed=corpus_cfg.seed, heldout_fraction=corpus_cfg.heldout_fraction,
            calib_fraction=corpus_cfg.calib_fraction, user_paths=list(corpus_cfg.user_paths),
        )))
    _barrier()
    heldout = work / "corpus" / "heldout.jsonl"
    results: dict = {}
    stage("eval_teacher", False, lambda: results.update(teacher=_perplexity(cfg, teacher, heldout)))

    arch = checkpoint.read_arch(teacher)
    summary = {
        "work_dir": str(work),
        "teacher_parameters": arch.num_parameters(),
        "teacher_heldout_perplexity": results["teacher"]["perplexity"],
        "eval": {k: results["teacher"][k] for k in ("tokens", "seq_len", "tokens_per_s")},
        "stage_seconds": stage_seconds,
    }
    if parallel.is_main_process():
        (work / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_table(summary)
    return summary


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _print_table(summary: dict) -> None:
    params = summary["teacher_parameters"]
    rows = [
        ("teacher parameters (total)", f"{params['total']:,}"),
        ("teacher parameters (non-embedding)", f"{params['non_embedding']:,}"),
        ("teacher held-out perplexity", f"{summary['teacher_heldout_perplexity']:.3f}"),
        ("eval tokens / window", f"{summary['eval']['tokens']:,} / {summary['eval']['seq_len']}"),
        *[(f"stage {k} (s)", f"{v:.1f}") for k, v in summary["stage_seconds"].items()],
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
