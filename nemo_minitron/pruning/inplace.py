"""`prune(model, scores, ...)`: the one call that prunes a caller's live megatron model in place.

The caller's `GPTModel` object (also inside megatron's `Float16Module`) becomes the pruned model:
the surgery of `prune_model` builds the pruned model with the same class, layer spec and settings
and loads the pruned weights, then the caller's object takes over its modules and config. Create
the optimizer and the DistributedDataParallel wrapper after pruning (their buffers hold shapes).
"""

from __future__ import annotations

from nemo_minitron.errors import UserError
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.gpt import arch_of, remember_identity, unwrap_model
from nemo_minitron.pruning.indices import choose_dropped_layers, select_indices
from nemo_minitron.pruning.reconstruct import check_options, record_statistics
from nemo_minitron.pruning.spec import PruneSpec
from nemo_minitron.pruning.surgery import prune_model

_DATA_PARALLEL_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "TorchFullyShardedDataParallel")


def _check_not_data_parallel(model) -> None:
    wrapper = model
    while hasattr(wrapper, "module"):
        if type(wrapper).__name__ in _DATA_PARALLEL_WRAPPERS:
            raise UserError(f"prune the model before wrapping it in {type(wrapper).__name__}: "
                            f"its gradient buffers are laid out for the unpruned shapes")
        wrapper = wrapper.module


def prune(
    model,
    scores: ImportanceScores,
    *,
    num_layers: int | None = None,
    drop_layers: list[int] | None = None,
    hidden_size: int | None = None,
    ffn_hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    num_query_groups: int | None = None,
    num_moe_experts: int | None = None,
    moe_ffn_hidden_size: int | None = None,
    moe_shared_expert_intermediate_size: int | None = None,
    moe_router_topk: int | None = None,
    mamba_num_heads: int | None = None,
    mamba_head_dim: int | None = None,
    num_mamba_layers: int | None = None,
    num_attention_layers: int | None = None,
    num_mlp_layers: int | None = None,
    depth_method: str = "block_importance",
    expert_method: str = "output",
    head_residual: bool = False,
    reconstruct_loop=None,
    reconstruct_ridge: float = 1.0e-2,
    reconstruct_depth: bool = False,
    bridge_loss=None,
):
    """Prune `model` in place to the given sizes (None keeps a size) and return its new
    `TransformerConfig`. Collective: every rank of the TP x PP layout calls it with the same scores.

    Width follows `scores` (hidden channels, heads by query group, neurons). Depth: `drop_layers`
    names the layers to drop; otherwise `num_layers` keeps that many, dropping those that
    `depth_method` ranks lowest in `scores` ("contiguous" reads `scores.blocks`, the others
    `scores.layers`). A mixture-of-experts model keeps the `num_moe_experts` experts per layer that
    `expert_method` ranks highest (`scores.experts`), each with its best `moe_ffn_hidden_size`
    neurons, and the shared expert's best `moe_shared_expert_intermediate_size`. A hybrid (Mamba)
    model keeps in every Mamba layer the `mamba_num_heads` best heads (the same number from each
    SSM group) and in every kept head the `mamba_head_dim` best channels; its depth goes by
    `drop_layers` or per layer kind: `num_mamba_layers`, `num_attention_layers`, `num_mlp_layers`
    keep the layers of that kind which `depth_method` ranks highest among the kind.

    Reconstruction: with `reconstruct_loop` (a forward loop, like `estimate_importance`'s), the
    unpruned model runs it once more with recording hooks, and the kept columns of every kept
    layer's `linear_fc2`, `linear_proj` and Mamba `out_proj` are refit to reproduce the unpruned outputs on those
    tokens (ridge least squares towards the plain prune, `reconstruct_ridge`; pruning/reconstruct.py);
    `reconstruct_depth` also fits the MLP before each dropped block to what the block added; with
    `bridge_loss` (model -> loss, e.g. `loss_metric(windows)`) each such bridge is kept only where
    the pruned model's loss is lower with it (`prune_model`).
    """
    from megatron.core import parallel_state as ps

    _check_not_data_parallel(model)
    if reconstruct_loop is not None:
        check_options(reconstruct_ridge, head_residual)
    teacher = arch_of(model)
    differences = scores.arch.differences(teacher)
    if differences:
        raise UserError(f"the importance scores were computed for a model of another architecture: "
                        f"{', '.join(differences)} (scores vs model)")
    spec = PruneSpec(num_layers=num_layers, drop_layers=drop_layers, hidden_size=hidden_size,
                     ffn_hidden_size=ffn_hidden_size, num_attention_heads=num_attention_heads,
                     num_query_groups=num_query_groups, num_moe_experts=num_moe_experts,
                     moe_ffn_hidden_size=moe_ffn_hidden_size,
                     moe_shared_expert_intermediate_size=moe_shared_expert_intermediate_size,
                     moe_router_topk=moe_router_topk, mamba_num_heads=mamba_num_heads, mamba_head_dim=mamba_head_dim,
                     num_mamba_layers=num_mamba_layers, num_attention_layers=num_attention_layers,
                     num_mlp_layers=num_mlp_layers)
    layout = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
              ps.get_expert_model_parallel_world_size())
    spec.target_arch(teacher, *layout)  # refuses a bad target before any work
    dropped = (sorted(drop_layers) if drop_layers is not None
               else choose_dropped_layers(scores, teacher, spec.num_dropped(teacher), depth_method,
                                          spec.dropped_per_kind(teacher)))
    target = spec.with_dropped(dropped).target_arch(teacher, *layout)
    indices = select_indices(scores, teacher, target, dropped, expert_method)
    reconstruction = None
    if reconstruct_loop is not None:
        reconstruction = record_statistics(model, indices, reconstruct_loop, reconstruct_ridge,
                                           bridge=reconstruct_depth)
    pruned = prune_model(model, target, indices, head_residual, reconstruction, bridge_loss)
    inner = unwrap_model(model)
    inner.__dict__.clear()
    inner.__dict__.update(pruned.__dict__)
    remember_identity(inner, target)
    return inner.config
