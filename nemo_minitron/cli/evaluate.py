"""minitron eval: held-out perplexity and/or lm-evaluation-harness tasks of a checkpoint, any TP/PP."""

from __future__ import annotations

import logging

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity, windows_from_stream

log = logging.getLogger("nemo_minitron")


def run(cfg) -> dict:
    tasks = list(cfg.harness.tasks)
    if not cfg.data and not tasks:
        raise ValueError("nothing to evaluate: set data=FILE (perplexity) and/or harness.tasks=[...]")
    arch = checkpoint.read_arch(cfg.checkpoint)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"checkpoint={cfg.checkpoint}: tokenizer has {len(tokenizer)} tokens > vocab_size {arch.vocab_size}")
    windows = None
    if cfg.data:
        windows = windows_from_stream(load_token_stream(cfg.data, tokenizer, text_key=cfg.text_key), cfg.seq_len, cfg.max_tokens)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=torch_dtype(cfg.dtype))
    result: dict = {"checkpoint": str(cfg.checkpoint), "tp": layout.tp, "pp": layout.pp}
    if windows is not None:
        log.info("perplexity over %d windows of %d tokens at %s", len(windows), cfg.seq_len, layout.describe())
        result.update(evaluate_perplexity(model, windows, cfg.micro_batch_size).as_dict(), data=str(cfg.data))
    if tasks:
        from nemo_minitron.eval.harness import run_harness

        log.info("lm-evaluation-harness: %s", ", ".join(tasks))
        h = cfg.harness
        result["harness"] = run_harness(model, tokenizer, tasks, include_path=h.include_path, num_fewshot=h.num_fewshot,
                                        limit=h.limit, max_length=h.max_length, batch_size=h.batch_size, seed=cfg.seed)
    return result
