"""minitron eval: held-out perplexity of a checkpoint at any TP/PP."""

from __future__ import annotations

import logging

from nemo_minitron import checkpoint, parallel
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.data.indexed import load_token_stream
from nemo_minitron.eval.perplexity import evaluate_perplexity, windows_from_stream

log = logging.getLogger("nemo_minitron")


def run(cfg) -> dict:
    arch = checkpoint.read_arch(cfg.checkpoint)
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    if len(tokenizer) > arch.vocab_size:
        raise ValueError(f"checkpoint={cfg.checkpoint}: tokenizer has {len(tokenizer)} tokens > vocab_size {arch.vocab_size}")
    stream = load_token_stream(cfg.data, tokenizer, text_key=cfg.text_key)
    windows = windows_from_stream(stream, cfg.seq_len, cfg.max_tokens)
    layout = parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=torch_dtype(cfg.dtype))
    log.info("evaluating %d windows of %d tokens at %s", len(windows), cfg.seq_len, layout.describe())
    result = evaluate_perplexity(model, windows, cfg.micro_batch_size)
    return {**result.as_dict(), "checkpoint": str(cfg.checkpoint), "data": str(cfg.data), "tp": layout.tp, "pp": layout.pp}
