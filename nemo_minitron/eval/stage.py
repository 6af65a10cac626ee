"""The evaluation stage: held-out perplexity and/or lm-evaluation-harness tasks of a checkpoint,
at any TP/PP."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from nemo_minitron import checkpoint, parallel
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.errors import UserError
from nemo_minitron.eval.perplexity import evaluate_perplexity, windows_from_stream
from nemo_minitron.stage_config import StageConfig, nested

log = logging.getLogger("nemo_minitron")


@dataclass
class HarnessConfig:
    tasks: list[str] = field(default_factory=list)   # task names; built-in tasks download their data from a hub
    include_path: str | None = None   # a directory of your own task YAMLs (e.g. dataset_path: json + local data_files)
    num_fewshot: int | None = None   # few-shot examples per prompt (null: each task's default)
    limit: Any = None                # documents per task (null: all)
    max_length: int = 2048   # context window for loglikelihood / generation
    batch_size: int = 8   # harness requests per forward pass
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_length", "batch_size")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("num_fewshot",)


@dataclass
class EvalConfig(StageConfig):
    checkpoint: str | None = None   # the checkpoint to evaluate
    data: str | None = None   # perplexity data: .txt / .jsonl file, a directory of them, or an indexed-dataset prefix
    text_key: str = "text"   # field holding the text in .jsonl files
    seq_len: int = 512   # predicted tokens per window (windows do not overlap)
    micro_batch_size: int = 4   # perplexity windows per forward pass
    max_tokens: int | None = None   # evaluate at most this many tokens, in windows spread evenly over the file (null: the whole file)
    # float32: one perplexity per checkpoint, the one transformers computes; auto | bfloat16 evaluate in bf16 (faster)
    dtype: str = "float32"
    # lm-evaluation-harness (pip install -e ".[eval]"), in process
    harness: HarnessConfig = nested(HarnessConfig)
    POSITIVE: ClassVar[tuple[str, ...]] = (*StageConfig.POSITIVE, "seq_len", "micro_batch_size", "max_tokens")


def _require_harness() -> None:
    """lm-evaluation-harness is an extra (`scripts/install.sh` installs the main job only)."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("harness.tasks needs lm-evaluation-harness 0.4.13, which is not installed: "
                        "pip install -e '.[eval]' (scripts/test.sh installs it too)") from None


def evaluate_checkpoint(cfg: EvalConfig) -> dict:
    cfg.require("checkpoint")
    tasks = list(cfg.harness.tasks)
    if not cfg.data and not tasks:
        raise UserError("nothing to evaluate: set data=FILE (perplexity) and/or harness.tasks=[...]")
    if tasks:
        _require_harness()
        include = cfg.harness.include_path
        if include is not None and not Path(include).is_dir():
            raise UserError(f"harness.include_path={include} is not a directory: point it at the directory of "
                            f"your task YAML files")
    arch = checkpoint.read_arch(cfg.checkpoint)
    arch.check_positions(cfg.seq_len, "seq_len")
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    if len(tokenizer) > arch.vocab_size:
        raise UserError(f"checkpoint={cfg.checkpoint}: tokenizer has {len(tokenizer)} tokens > vocab_size {arch.vocab_size}")
    windows = None
    if cfg.data:
        windows = windows_from_stream(load_token_stream(cfg.data, tokenizer, text_key=cfg.text_key), cfg.seq_len, cfg.max_tokens)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed, ep=cfg.ep)
    model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=cfg.torch_dtype)
    if cfg.torch_dtype != torch.float32:  # every weight in that dtype, as in training (train/optim.py)
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    result: dict = {"checkpoint": str(cfg.checkpoint), "tp": layout.tp, "pp": layout.pp, "dtype": cfg.dtype}
    if windows is not None:
        log.info("perplexity over %d windows of %d tokens at %s", len(windows), cfg.seq_len, layout.describe())
        scored = evaluate_perplexity(model, windows, cfg.micro_batch_size)
        if not math.isfinite(scored.nll):
            raise UserError(f"checkpoint={cfg.checkpoint} gives a non-finite loss ({scored.nll}) on data={cfg.data}: "
                            f"its weights hold NaN or Inf (a diverged run?); evaluate an earlier checkpoint")
        result.update(scored.as_dict(), data=str(cfg.data))
    if tasks:
        from nemo_minitron.eval.harness import run_harness

        log.info("lm-evaluation-harness: %s", ", ".join(tasks))
        h = cfg.harness
        result["harness"] = run_harness(model, tokenizer, tasks, include_path=h.include_path, num_fewshot=h.num_fewshot,
                                        limit=h.limit, max_length=h.max_length, batch_size=h.batch_size, seed=cfg.seed)
    return result
