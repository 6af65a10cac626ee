"""Greedy decoding with a (possibly TP/PP-split) Megatron model: every rank gets the same tokens."""

from __future__ import annotations

import torch

from nemo_minitron.models.runner import broadcast_from_last_stage, forward_microbatches, gather_vocab_parallel


def greedy_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, max_length: int,
                    stop: list[str] = ()) -> tuple[list[int], str]:
    """Generate until EOS, a stop string, or max_new_tokens; returns (new token ids, their text cut
    at the first stop string). No KV cache: each step re-runs the window of the last max_length
    tokens, which is fine for evaluation-sized outputs."""
    generated: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        window = (prompt_ids + generated)[-max_length:]
        out = forward_microbatches(
            model, [{"tokens": torch.tensor([window])}], lambda logits, _: int(gather_vocab_parallel(logits)[0, -1].argmax())
        )
        next_id = broadcast_from_last_stage(out)[0]
        if next_id == tokenizer.eos_token_id:
            break
        generated.append(next_id)
        text = tokenizer.decode(generated)
        if any(s in text for s in stop):
            break
    for s in stop:
        text = text.split(s)[0]
    return generated, text
