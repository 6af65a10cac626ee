"""minitron generate: greedy generation, optionally conditioned on SteerLM attribute values."""

from __future__ import annotations

from nemo_minitron import checkpoint, parallel
from nemo_minitron.align.datasets import attribute_instruction, parse_attributes
from nemo_minitron.align.formatting import Turn, generation_prompt
from nemo_minitron.cli.common import torch_dtype
from nemo_minitron.eval.generate import greedy_generate


def prompt_ids(cfg, tokenizer) -> list[int]:
    if not cfg.chat:
        if cfg.attributes or cfg.system:
            raise ValueError("attributes= and system= need chat=true")
        return tokenizer(cfg.prompt, add_special_tokens=False).input_ids
    turns = [Turn("system", cfg.system)] if cfg.system else []
    turns.append(Turn("user", cfg.prompt))
    if cfg.attributes:
        # The same place SteerLM training puts them: a system message right before the answer.
        turns.append(Turn("system", attribute_instruction(parse_attributes(cfg.attributes))))
    return generation_prompt(tokenizer, turns)


def run(cfg) -> dict:
    tokenizer = checkpoint.load_tokenizer(cfg.checkpoint)
    ids = prompt_ids(cfg, tokenizer)
    parallel.initialize(cfg.tp, cfg.pp, cfg.seed)
    model = checkpoint.load_checkpoint(cfg.checkpoint, params_dtype=torch_dtype(cfg.dtype))
    new_ids, text = greedy_generate(model, tokenizer, ids, cfg.max_new_tokens, cfg.max_length)
    return {"text": text, "new_tokens": len(new_ids), "prompt_tokens": len(ids)}
