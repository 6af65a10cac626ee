"""First-order (Taylor) importance from megatron's own backward, at any TP x PP x DP.

The mean token NLL L over the calibration windows is back-propagated through megatron's schedule
(`models.runner.forward_microbatches(..., forward_only=False)`), which leaves G_w = dL/dw in every
parameter's `.grad`: the gradient over all calibration tokens, as LLM-Pruner accumulates it. Removing
a unit (a neuron, a head, a hidden channel) zeroes a group of weights W_u, and to first order the
loss changes by -sum_{w in W_u} w G_w. A unit's score is its group Taylor sum

    score(u) = sum_{w in W_u} |w G_w|

(LLM-Pruner's element-wise first-order criterion; torch-pruning's `GroupTaylorImportance` ranks
neurons identically, its group mean and mean-normalisation being constant factors, and counts only
linear layers for hidden channels), where W_u is every weight that reads or writes the unit:
- MLP neuron j: its `linear_fc1` row (SwiGLU: its gate row and its up row) and its `linear_fc2` column;
- attention head: its query rows of `linear_qkv` (and Qwen2's query bias) and its `linear_proj`
  columns (keys and values belong to the query group, which is ranked by its heads' scores);
- a hybrid's Mamba head and head channel: `scores.mamba_unit_sums` (their z, x and dt rows of
  `in_proj`, conv1d channels, dt_bias, A_log, D, gated-norm weights and `out_proj` columns);
- hidden channel c: column c of the embedding, of every `linear_qkv` / `linear_fc1` / Mamba
  `in_proj` and of an untied output layer, row c of every `linear_proj` / `linear_fc2` / Mamba
  `out_proj`, entry c of every norm weight (and LayerNorm bias), summed over the whole model.

Gradients are summed over data-parallel replicas, and at PP > 1 the first stage's embedding and the
last stage's tied output-layer copy add their gradients (as megatron's `finalize_model_grads` does),
so every layout sees the gradient of TP=1; the global weights and gradients are then gathered
(`bridge.gather_global`) and scored by the pure function `taylor_scores`.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.importance.scores import ImportanceScores, mamba_unit_sums
from nemo_minitron.models import bridge
from nemo_minitron.models.config import LAYER_PARTS, ModelArch
from nemo_minitron.models.gpt import arch_of, unwrap_model
from nemo_minitron.models.runner import broadcast_from_last_stage, forward_microbatches, vocab_parallel_token_nll

log = logging.getLogger("nemo_minitron")

SCHEDULE_MICRO_BATCHES = 8  # micro-batches per schedule call, as in eval.perplexity


def _unit_sums(arch: ModelArch, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per unit, the sum of a per-weight value over the weights W_u of the unit (module docstring),
    from global-layout tensors: `hidden` [h], `heads` [L, heads], `neurons` [L, ffn], and a hybrid's
    `mamba_heads` / `mamba_channels` (zeros in the layers without the unit)."""
    G, d, h = arch.num_query_groups, arch.kv_channels, arch.hidden_size
    H, L = arch.num_attention_heads, arch.num_layers
    hidden = values["embedding.word_embeddings.weight"].sum(0)
    if "output_layer.weight" in values:
        hidden = hidden + values["output_layer.weight"].sum(0)
    for param in arch.norm_params:
        hidden = hidden + values[f"{bridge.final_norm(arch)}{param}"]
    sums = {"heads": hidden.new_zeros(L, H), "neurons": hidden.new_zeros(L, arch.ffn_hidden_size)}
    if arch.is_hybrid:
        sums |= {"mamba_heads": hidden.new_zeros(L, arch.mamba_num_heads),
                 "mamba_channels": hidden.new_zeros(L, arch.mamba_head_dim)}
    for i, kind in enumerate(arch.layer_types):
        prefix = f"decoder.layers.{i}."
        v = {k[len(prefix):]: t for k, t in values.items() if k.startswith(prefix)}
        for norm in bridge.layer_norms(arch, i):
            for param in arch.norm_params:
                hidden = hidden + v[f"{norm}{param}"]
        if "attention" in LAYER_PARTS[kind]:
            qkv, proj = v["self_attention.linear_qkv.weight"], v["self_attention.linear_proj.weight"]
            hidden = hidden + qkv.sum(0) + proj.sum(1)
            query = qkv.view(G, H // G + 2, d, h)[:, : H // G].sum((2, 3)).reshape(H)
            if arch.qkv_bias:
                query = query + v["self_attention.linear_qkv.bias"].view(G, H // G + 2, d)[:, : H // G].sum(2).reshape(H)
            sums["heads"][i] = query + proj.view(h, H, d).sum((0, 2))
        if "mlp" in LAYER_PARTS[kind]:
            fc1, fc2 = v["mlp.linear_fc1.weight"], v["mlp.linear_fc2.weight"]
            hidden = hidden + fc1.sum(0) + fc2.sum(1)
            rows = sum(part.sum(1) for part in fc1.chunk(2)) if arch.gated else fc1.sum(1)
            sums["neurons"][i] = rows + fc2.sum(0)
        if "mamba" in LAYER_PARTS[kind]:
            layer_hidden, sums["mamba_heads"][i], sums["mamba_channels"][i] = mamba_unit_sums(arch, v)
            hidden = hidden + layer_hidden
    return {"hidden": hidden, **sums}


def _require_supported(arch: ModelArch) -> None:
    if arch.is_moe:
        raise UserError("importance=taylor scores dense and hybrid (Mamba) layers; this model has mixture-of-experts "
                        "layers: use importance=activation")


@torch.no_grad()
def taylor_scores(arch: ModelArch, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> ImportanceScores:
    """Group Taylor scores sum_{w in W_u} |w G_w| of every unit from global weights and their
    gradients (module docstring)."""
    _require_supported(arch)
    salience = {name: (w.float() * grads[name].float()).abs() for name, w in weights.items()}
    return ImportanceScores(arch=arch, method="taylor", **_unit_sums(arch, salience))


def _sum_gradients_over_copies(model) -> None:
    """Make every rank's `.grad` the gradient of the whole calibration set: sum over data-parallel
    replicas, and at PP > 1 over the two copies of a tied embedding (first and last stage)."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_world_size() > 1:
        for param in model.parameters():
            dist.all_reduce(param.grad, group=ps.get_data_parallel_group())
    inner = unwrap_model(model)
    if (ps.get_pipeline_model_parallel_world_size() > 1 and inner.share_embeddings_and_output_weights
            and ps.is_rank_in_embedding_group()):
        dist.all_reduce(inner.shared_embedding_or_output_weight().grad, group=ps.get_embedding_group())


def calibration_gradients(model, windows: torch.Tensor, micro_batch_size: int = 4) -> float:
    """Leave dL/dw in every parameter's `.grad` (replacing what was there), L = the mean token NLL
    over all `windows` ([n, s + 1]; split over data-parallel replicas); return L (collective).

    megatron divides each micro-batch's loss by the number of micro-batches in a schedule call, so
    the loss handed to it is that count times the micro-batch's share of L."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    total_tokens = windows.shape[0] * (windows.shape[1] - 1)
    mine = windows[dp_rank::dp]
    micro_batches = [{"tokens": w[:, :-1], "labels": w[:, 1:]} for w in mine.split(micro_batch_size)]
    full = [mb for mb in micro_batches if len(mb["tokens"]) == micro_batch_size]
    ragged = [mb for mb in micro_batches if len(mb["tokens"]) != micro_batch_size]
    groups = [full[i: i + SCHEDULE_MICRO_BATCHES] for i in range(0, len(full), SCHEDULE_MICRO_BATCHES)]
    for param in model.parameters():
        param.grad = None
    loss = torch.zeros((), dtype=torch.float64)
    for group in groups + [[mb] for mb in ragged]:
        def share(logits, mb, n=len(group)):
            return vocab_parallel_token_nll(logits, mb["labels"]).sum() * (n / total_tokens)

        losses = forward_microbatches(model, group, share, forward_only=False)
        loss += sum(value.double() for value in losses) / len(group)
    [loss] = broadcast_from_last_stage([loss])
    if dist.is_initialized() and dp > 1:
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
    _sum_gradients_over_copies(model)
    return loss.item()


def estimate_taylor_importance(model, windows: torch.Tensor, micro_batch_size: int = 4) -> ImportanceScores:
    """Group Taylor scores of every unit from the LM loss on `windows` (collective: every rank of
    the TP x PP x DP layout calls it with the same windows). The model runs in eval mode (no
    dropout); its gradients are freed afterwards."""
    arch = arch_of(model)
    _require_supported(arch)
    if unwrap_model(model).config.sequence_parallel:
        # megatron all-reduces the norms' partial gradients under sequence parallelism in
        # finalize_model_grads, which this backward does not run
        raise UserError("importance=taylor does not support sequence parallelism; run without it")
    start = time.perf_counter()
    log.info("importance: calibration forward and backward over %d windows of %d tokens", len(windows),
             windows.shape[1] - 1)
    was_training = model.training
    model.eval()
    try:
        loss = calibration_gradients(model, windows, micro_batch_size)
        scores = taylor_scores(arch, bridge.gather_global(model), bridge.gather_global(model, grads=True))
    finally:
        model.train(was_training)
        for param in model.parameters():
            param.grad = None
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    log.info("importance: %d tokens in %.1f s (%.0f tokens/s), calibration loss %.4f", tokens, seconds,
             tokens / seconds, loss)
    scores.info = {"windows": len(windows), "seq_len": windows.shape[1] - 1, "tokens": tokens,
                   "tokens_per_s": round(tokens / seconds, 1), "calibration_loss": loss, "seconds": round(seconds, 3)}
    return scores
