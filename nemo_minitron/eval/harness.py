"""lm-evaluation-harness on our Megatron models, in process, at any TP x PP.

`MegatronLM` is an `lm_eval` `LM`: loglikelihood (multiple choice), rolling loglikelihood
(perplexity tasks) and greedy generation, computed through megatron's schedule with vocab-parallel
log-probabilities (logits are never gathered across TP ranks). Every rank runs the same requests in
lock-step (the model is split, not the data) and receives the last stage's results, so the
harness sees a world of one; only rank 0 reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from tqdm import tqdm

from nemo_minitron import parallel
from nemo_minitron.errors import UserError
from nemo_minitron.eval.generate import greedy_generate
from nemo_minitron.models.runner import (
    broadcast_from_last_stage,
    forward_microbatches,
    vocab_parallel_token_nll,
)


def _label_logit_is_max(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, s] bool: the label's logit is the largest in the full (TP-sharded) vocabulary."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    vocab_shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * vocab_shard
    local = labels - start
    owned = (local >= 0) & (local < vocab_shard)
    label_logit = torch.where(owned, logits.gather(-1, local.clamp(0, vocab_shard - 1).unsqueeze(-1)).squeeze(-1), 0.0)
    max_logit = logits.max(dim=-1).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(label_logit, group=group)
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
    return label_logit >= max_logit


class MegatronLM(LM):
    """An lm-eval model over a (possibly TP/PP-split) Megatron GPTModel and its HF tokenizer."""

    def __init__(self, model, tokenizer, max_length: int = 2048, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.eos_id = tokenizer.eos_token_id

    # The harness shards requests by these; model parallel ranks must all see every request.
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _score(self, sequences: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n_scored): sum of log-probs of the last n_scored tokens given the
        rest, and whether each of them is the greedy choice."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # similar lengths batch together
        by_index: dict[int, tuple[float, bool]] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = [order[i] for i in range(start, min(start + self.batch_size, len(order)))]
            width = max(len(sequences[i][0]) for i in chunk) - 1
            tokens = torch.full((len(chunk), width + 1), self.eos_id, dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                seq, n = sequences[i]
                tokens[row, : len(seq)] = torch.tensor(seq)
                scored[row, len(seq) - 1 - n : len(seq) - 1] = True  # right padding never affects earlier positions

            def per_microbatch(logits, batch):
                labels = batch["labels"]
                logprob = -vocab_parallel_token_nll(logits, labels)
                greedy = _label_logit_is_max(logits.float(), labels)
                mask = batch["scored"]
                return (logprob * mask).sum(-1), (greedy | ~mask).all(-1)

            out = forward_microbatches(
                self.model, [{"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "scored": scored}], per_microbatch
            )
            out = broadcast_from_last_stage([(lp.tolist(), g.tolist()) for lp, g in out])
            (logprobs, greedy), = out
            for row, i in enumerate(chunk):
                by_index[i] = (float(logprobs[row]), bool(greedy[row]))
        return [by_index[i] for i in range(len(sequences))]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """Truncate on the left so context + continuation fits max_length + 1 tokens."""
        seq = (context + continuation)[-(self.max_length + 1) :]
        return seq, min(len(continuation), len(seq) - 1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        sequences = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) if context else [self.eos_id]
            sequences.append(self._fit(ctx, self._encode(continuation)))
        return self._score(sequences)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-document log-likelihood over lm-eval's rolling windows of max_length tokens (the
        harness's own windowing, so numbers compare with its other backends)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=not parallel.is_main_process()):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self._encode(req.args[0]), prefix_token=self.eos_id, max_seq_len=self.max_length,
                context_len=1,
            ))
            out.append(sum(lp for lp, _ in self._score([self._fit(ctx, cont) for ctx, cont in windows])))
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy decoding until a stop string, EOS or max_gen_toks."""
        outputs = []
        for req in tqdm(requests, desc="generate_until", disable=not parallel.is_main_process()):
            context, gen_kwargs = req.args
            stops = gen_kwargs.get("until") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            limit = gen_kwargs.get("max_gen_toks", self.max_gen_toks)
            # Like lm-eval's HF backend: keep room for the generated tokens in the window.
            tokens = self._encode(context)[-max(1, self.max_length - limit) :]
            _, text = greedy_generate(self.model, self.tokenizer, tokens, limit, self.max_length, stops)
            outputs.append(text)
        return outputs


def run_harness(model, tokenizer, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                limit: int | float | None = None, max_length: int = 2048, batch_size: int = 8,
                seed: int = 1234) -> dict:
    """`lm_eval.simple_evaluate` with our model; returns {task: {metric: value}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"harness.tasks: unknown task(s) {unknown}; set harness.include_path= to a directory of task YAMLs")
    lm = MegatronLM(model, tokenizer, max_length=max_length, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed, bootstrap_iters=0,
    )
    # lm-eval builds results only where LOCAL_RANK == 0; share rank 0's with every rank.
    summary = None if results is None else {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
        for task, metrics in results["results"].items()
    }
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary
