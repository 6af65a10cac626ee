"""megatron-core `GPTModel`s (and, for the hybrid family, `MambaModel`s): build one for a
`ModelArch`, and read the `ModelArch` of any one.

`build_gpt_model(arch)` builds this rank's stage under the initialised TP/PP layout. `arch_of(model)`
is its inverse for a model anybody built (ours, or a caller's own `GPTModel` on the local or the
Transformer Engine spec, also inside megatron's `Float16Module`): the shapes come from the model's
`TransformerConfig`, the vocabulary, rotary and embedding-tying settings from the `GPTModel`
itself. What a model cannot tell (which of the families that compute alike it belongs to, e.g.
Llama or Mistral, and its BOS/EOS token ids) is remembered when weights are loaded from a
checkpoint or a Hugging Face directory; otherwise the family follows from the layers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import weakref
from typing import Any

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import (IDENTITY_KEYS, LAYER_SYMBOLS, MAMBA_CONV_KERNEL, MAMBA_KEYS,
                                         MOE_SHAPE_KEYS, ModelArch)
from nemo_minitron.models.families import FAMILIES, computes_alike, family_attention, family_of

# model -> {family, bos_token_id, eos_token_id} of the weights it holds (see `remember_identity`).
_IDENTITY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def layer_spec(normalization: str, use_te: bool | None = None, qk_norm: bool = False, num_experts: int | None = None):
    """TE layer spec in the GPU container (fused norm+linear), the local spec everywhere else.
    (The TE spec takes the norm kind from the TransformerConfig; the local spec needs it here.)
    `qk_norm`: self-attention gets `q_layernorm` / `k_layernorm` modules of head_dim (Qwen3); the
    TransformerConfig must say `qk_layernorm=True` too. QKV biases need only the config.
    `num_experts`: the MLP is megatron's MoE layer with its experts one MLP each (`SequentialMLP`,
    of TE linears in the TE spec), so importance can hook every expert; TE's grouped GEMM, faster
    on GPUs, is not used yet (the config's `moe_grouped_gemm` is False to match)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=qk_norm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization,
                                                        qk_layernorm=qk_norm)
    return portable_norm_keys(spec)


def portable_norm_keys(spec):
    """`spec` saving its per-layer norms under the fused-norm checkpoint keys whatever module holds
    them. megatron's local spec maps `input_layernorm.` / `pre_mlp_layernorm.` to
    `self_attention.linear_qkv.layer_norm_` / `mlp.linear_fc1.layer_norm_`; its TE spec fuses the
    norms into those linears, except the pre-MLP norm of an MoE layer, a separate module it saves
    as `pre_mlp_layernorm.weight`. Mapping that one too keeps MoE checkpoints loadable in either spec."""
    from megatron.core.transformer.identity_op import IdentityOp

    layer = spec.submodules
    if layer.pre_mlp_layernorm is not IdentityOp and "pre_mlp_layernorm." not in layer.sharded_state_dict_keys_map:
        layer.sharded_state_dict_keys_map = {**layer.sharded_state_dict_keys_map,
                                             "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    return spec


def hybrid_stack_spec(use_te: bool | None = None):
    """The layer spec of a hybrid model: megatron's own (Transformer Engine, norms fused into the
    first linear of each layer) in the GPU container, else the same layers on the local spec's
    modules, each layer's norm a separate module saved under the fused name (as `portable_norm_keys`
    does for GPT layers), so checkpoints load in either."""
    from nemo_minitron.models import mamba_kernels

    mamba_kernels.install()  # before megatron's mixer module is imported
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        from megatron.core.models.mamba.mamba_layer_specs import mamba_stack_spec

        return mamba_stack_spec
    gpt = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    norm = gpt.input_layernorm
    mixer = ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                                          out_proj=RowParallelLinear))
    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm, mixer=mixer, mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm, self_attention=gpt.self_attention, self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=gpt.mlp, mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})),
    ))


def build_gpt_model(
    arch: ModelArch,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    sequence_parallel: bool = False,
):
    """The stage of `arch` that this rank holds under the initialised TP/PP layout (`sequence_parallel`:
    see `transformer_config`): a `GPTModel`, or for a hybrid a `MambaModel`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype,
                                ep=ps.get_expert_model_parallel_world_size(), sequence_parallel=sequence_parallel)
    if arch.is_hybrid:
        model = _build_hybrid_model(arch, config, hybrid_stack_spec(use_te), ps.is_pipeline_first_stage(),
                                    ps.is_pipeline_last_stage())
    else:
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(arch.normalization, use_te, arch.qk_norm, arch.num_moe_experts),
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_percent=arch.rotary_percent,
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        )
    remember_identity(model, arch)
    if torch.cuda.is_available():
        model.cuda()
    return model


def _build_hybrid_model(arch: ModelArch, config, spec, pre_process: bool, post_process: bool,
                        **output_settings: Any):
    """A `MambaModel` of `arch`'s layer pattern (attention without positional embeddings)."""
    from megatron.core.models.mamba import MambaModel

    settings = dict(parallel_output=True, share_embeddings_and_output_weights=arch.tie_embeddings) | output_settings
    return MambaModel(config=config, mamba_stack_spec=spec, vocab_size=arch.vocab_size,
                      max_sequence_length=arch.max_position_embeddings, pre_process=pre_process,
                      post_process=post_process, hybrid_override_pattern=arch.hybrid_pattern,
                      position_embedding_type="none", **settings)


def rebuild_gpt_model(model, arch: ModelArch):
    """A new, freshly initialised model of `model`'s own class and layer spec for the architecture
    `arch` on this rank (same stage flags, output and rotary settings; `TransformerConfig` =
    `model`'s with the shape keys of `arch`). Used to prune a caller's model keeping its spec."""
    model = unwrap_model(model)
    config = dataclasses.replace(
        model.config, num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels, **{key: getattr(arch, key) for key in (*MOE_SHAPE_KEYS, "moe_router_topk")},
        **({key: getattr(arch, key) for key in MAMBA_KEYS} if arch.is_hybrid else {}),
    )
    like = next(model.parameters())  # Float16Module casts after construction: follow the weights
    if arch.is_hybrid:
        new = _build_hybrid_model(arch, config, model.mamba_stack_spec, model.pre_process, model.post_process,
                                  fp16_lm_cross_entropy=model.fp16_lm_cross_entropy,
                                  parallel_output=model.parallel_output)
        remember_identity(new, arch)
        return new.to(device=like.device, dtype=like.dtype)
    new = type(model)(
        config=config,
        transformer_layer_spec=model.transformer_layer_spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=model.max_sequence_length,
        pre_process=model.pre_process,
        post_process=model.post_process,
        fp16_lm_cross_entropy=model.fp16_lm_cross_entropy,
        parallel_output=model.parallel_output,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    remember_identity(new, arch)
    return new.to(device=like.device, dtype=like.dtype)


def remember_identity(model, arch: ModelArch) -> None:
    """Record what `model`'s layers cannot tell: the family name and the BOS/EOS token ids of `arch`."""
    _IDENTITY[unwrap_model(model)] = {key: getattr(arch, key) for key in IDENTITY_KEYS}


def unwrap_model(model):
    """The `GPTModel` or `MambaModel` inside megatron's `Float16Module` / `DistributedDataParallel`
    wrappers (one model chunk per pipeline stage: a list of several chunks is virtual pipelining,
    unsupported)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.mamba import MambaModel

    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise UserError(f"got {len(model)} model chunks: virtual pipeline parallelism is not supported, "
                            f"pass one GPTModel per pipeline stage")
        model = model[0]
    while not isinstance(model, (GPTModel, MambaModel)):
        inner = getattr(model, "module", None)
        if inner is None:
            raise UserError(f"{type(model).__name__} is not a megatron-core GPTModel or MambaModel (nor a wrapper "
                            f"of one)")
        model = inner
    return model


def is_hybrid_model(model) -> bool:
    """Whether `model` (wrappers looked through) is a megatron-core `MambaModel`."""
    return hasattr(unwrap_model(model), "mamba_stack_spec")


def transformer_config(arch: ModelArch, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                       ep: int = 1, sequence_parallel: bool = False):
    """The megatron `TransformerConfig` for `arch` at a parallel layout. With `sequence_parallel`
    (tp > 1) the activations outside attention and MLP are split along the sequence over the TP
    ranks, as training an MoE at tp > 1 needs."""
    from megatron.core.transformer import TransformerConfig

    arch.check_parallel(tp, pp, ep)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_eps,
        normalization=arch.normalization,
        gated_linear_unit=arch.gated,
        activation_func=torch.nn.functional.silu if arch.gated else megatron_squared_relu(),
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # Fusions need CUDA kernels (apex/TE); the unfused paths are exact and work everywhere.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        init_method_std=0.02,
        **_megatron_moe_fields(arch),
        **({"is_hybrid_model": True, **{key: getattr(arch, key) for key in MAMBA_KEYS}} if arch.is_hybrid else {}),
    )


def _megatron_moe_fields(arch: ModelArch) -> dict[str, Any]:
    """The MoE fields of the `TransformerConfig` (none for a dense model). Routing in fp32 as HF
    computes it; no load-balancing loss (HF adds none unless `output_router_logits`); the
    all-gather token dispatcher, which every backend runs (gloo included); experts as one MLP
    each (`gpt.layer_spec`)."""
    from megatron.core.transformer import TransformerConfig

    if not arch.is_moe:
        return {}
    shared = {}
    if arch.moe_shared_expert_intermediate_size is not None:
        # megatron-core 0.16 made the shared expert's gate a config field; before, its MoE spec
        # builds every shared expert without one
        if "moe_shared_expert_gate" not in TransformerConfig.__dataclass_fields__:
            raise UserError(f"{arch.family}'s gated shared expert needs megatron-core >= 0.16 (this one builds "
                            f"shared experts without their gate)")
        shared = dict(moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
                      moe_shared_expert_gate=True)
    return dict(
        num_moe_experts=arch.num_moe_experts,
        moe_router_topk=arch.moe_router_topk,
        moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
        **shared,
        moe_router_pre_softmax=arch.moe_router_pre_softmax,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
    )


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, the Nemotron MLP activation, for megatron-core versions that do not ship one."""
    return torch.pow(torch.nn.functional.relu(x), 2)


def megatron_squared_relu():
    """The squared-ReLU function megatron-core models use: `megatron.core.activations.squared_relu`
    from 0.14 on; 0.13 has no such module, so this module's `squared_relu` there. Always the same
    object within a process, so `models.gpt.arch_of` can recognise it by identity."""
    try:
        from megatron.core.activations import squared_relu as megatron_version
    except ModuleNotFoundError:  # megatron-core 0.13
        return squared_relu
    return megatron_version


def _family(config, hybrid: bool = False) -> str:
    """The family whose layers `config` describes: Llama for RMSNorm + SwiGLU, Qwen2 when it adds
    QKV biases, Qwen3 when it adds query/key norms; in a `hybrid` (Mamba) stack, Nemotron-H."""
    activation = config.activation_func
    if config.gated_linear_unit and activation is torch.nn.functional.silu:
        kind = "swiglu"
    elif not config.gated_linear_unit and activation is megatron_squared_relu():
        kind = "squared_relu"
    else:
        name = getattr(activation, "__name__", str(activation))
        raise UserError(f"unsupported MLP: activation {name} with gated_linear_unit={config.gated_linear_unit} "
                        f"(nemo-minitron prunes SwiGLU and squared-ReLU MLPs)")
    extras = {"qkv_bias": bool(config.add_qkv_bias), "qk_norm": bool(getattr(config, "qk_layernorm", False))}
    family = family_of(config.normalization, kind, extras["qkv_bias"], extras["qk_norm"],
                       config.num_moe_experts is not None, config.moe_shared_expert_intermediate_size is not None,
                       hybrid)
    if family is not None:
        return family
    if hybrid:
        raise UserError(f"unsupported hybrid layers: normalization={config.normalization} with a {kind} MLP, "
                        f"add_qkv_bias={extras['qkv_bias']}, qk_layernorm={extras['qk_norm']} (Nemotron-H's are "
                        f"RMSNorm with squared-ReLU MLPs and plain attention)")
    raise UserError(f"unsupported layers: normalization={config.normalization} with a {kind} MLP, "
                    f"add_qkv_bias={extras['qkv_bias']}, qk_layernorm={extras['qk_norm']}, "
                    f"num_moe_experts={config.num_moe_experts} and moe_shared_expert_intermediate_size="
                    f"{config.moe_shared_expert_intermediate_size} (no supported family has these: QKV biases "
                    f"come with RMSNorm + SwiGLU (Qwen2, and Qwen2-MoE with a shared expert), query/key norms too "
                    f"(Qwen3, Qwen3-MoE), experts without either are Mixtral's)")


def _qk_norm_problem(model) -> str | None:
    """What nemo-minitron cannot compute in `model`'s query/key norms (None: nothing). Supported:
    none (megatron's IdentityOp) or a norm with a [head_dim] weight in every layer, as its config's
    `qk_layernorm` says (megatron applies whatever modules the layer spec put there)."""
    from megatron.core.transformer.identity_op import IdentityOp

    wanted = bool(getattr(model.config, "qk_layernorm", False))
    for layer in model.decoder.layers:
        for name in ("q_layernorm", "k_layernorm"):
            norm = getattr(getattr(layer, "self_attention", None), name, None)
            if norm is not None and not isinstance(norm, IdentityOp) and getattr(norm, "weight", None) is None:
                return f"query/key norms without a weight ({type(norm).__name__}, e.g. qk_l2_norm=True)"
            if (norm is not None and not isinstance(norm, IdentityOp)) != wanted:
                return (f"qk_layernorm={wanted} but the layer spec's {name} is {type(norm).__name__}: build the "
                        f"spec with qk_layernorm={wanted} too")
    return None


# TransformerConfig fields (also NeMo 2's model config fields) that make a model nemo-minitron cannot
# prune or convert: field -> what it is. Each is false / None by default.
UNSUPPORTED_FIELDS = {
    "add_bias_linear": "linear biases",
    "multi_latent_attention": "multi-latent attention",
    "mtp_num_layers": "multi-token prediction layers",
    "rotary_interleaved": "interleaved rotary embeddings",
    "seq_len_interpolation_factor": "rotary sequence interpolation",
    "apply_residual_connection_post_layernorm": "post-norm residuals",
    "heterogeneous_block_specs": "heterogeneous layers",
    "is_hybrid_model": "a hybrid (Mamba) model",
}


def config_problems(config, hybrid: bool = False) -> list[str]:
    """What in `config` (a `TransformerConfig`, or any object with its field names, as NeMo 2's model
    config) no supported family has, one phrase each: `UNSUPPORTED_FIELDS` and the MoE settings.
    `hybrid`: the config is a Mamba stack's, whose `is_hybrid_model` is no problem."""
    problems = [f"{what} ({name}={getattr(config, name)})" for name, what in UNSUPPORTED_FIELDS.items()
                if getattr(config, name, None) and not (hybrid and name == "is_hybrid_model")]
    return problems + (moe_problems(config) if getattr(config, "num_moe_experts", None) else [])


def arch_fields(config, family: str) -> dict[str, Any]:
    """The `ModelArch` fields a `TransformerConfig` states (or any object with its field names, as
    NeMo 2's model config, with megatron's defaults for those it leaves out), for layers of `family`:
    the shape, the norm epsilon, the family's attention extras and the MoE fields. The one reader of
    `arch_of` (a live model) and `nemo2.arch_from_config` (a checkpoint's model.yaml)."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    moe = {}
    if FAMILIES[family].is_moe:  # megatron: the experts' width defaults to ffn_hidden_size, top-k to 2
        moe = {"num_moe_experts": config.num_moe_experts, "moe_router_topk": getattr(config, "moe_router_topk", 2),
               "moe_ffn_hidden_size": getattr(config, "moe_ffn_hidden_size", None) or config.ffn_hidden_size,
               "moe_shared_expert_intermediate_size": getattr(config, "moe_shared_expert_intermediate_size", None),
               "moe_router_pre_softmax": bool(getattr(config, "moe_router_pre_softmax", False))}
    mamba = mamba_fields(config) if FAMILIES[family].hybrid else {}
    return dict(
        num_layers=config.num_layers,
        hidden_size=hidden,
        # Mixtral has one intermediate size, the experts'
        ffn_hidden_size=moe["moe_ffn_hidden_size"] if family == "mixtral" else config.ffn_hidden_size,
        num_attention_heads=heads,
        num_query_groups=getattr(config, "num_query_groups", None) or heads,
        kv_channels=getattr(config, "kv_channels", None) or hidden // heads,
        norm_eps=float(getattr(config, "layernorm_epsilon", 1e-5)),
        family=family,
        **family_attention(family),
        **moe,
        **mamba,
    )


def mamba_fields(source) -> dict[str, Any]:
    """The `ModelArch` Mamba fields of anything that names them as megatron-core does (a
    `TransformerConfig`, Megatron-LM's args, NeMo 2's model config). Unset heads are what megatron's
    mixer makes: hidden x expand 2 / head_dim."""
    fields = {key: getattr(source, key, None) for key in MAMBA_KEYS}
    fields["mamba_num_heads"] = fields["mamba_num_heads"] or 2 * source.hidden_size // fields["mamba_head_dim"]
    return fields


def _check_supported(model) -> None:
    """UserError naming every feature of `model` that nemo-minitron cannot prune or convert."""
    config = model.config
    hybrid = is_hybrid_model(model)
    problems = config_problems(config, hybrid)
    qk_norm_problem = _qk_norm_problem(model)
    if qk_norm_problem:
        problems.append(qk_norm_problem)
    if config.layernorm_zero_centered_gamma:
        problems.append("zero-centred norm gammas (layernorm_zero_centered_gamma=True)")
    wanted = "none" if hybrid else "rope"  # Nemotron-H's attention has no positional embedding
    if model.position_embedding_type != wanted:
        problems.append(f"position_embedding_type={model.position_embedding_type!r} ({wanted} only in a "
                        f"{'hybrid' if hybrid else 'GPT'} model)")
    if hybrid:
        problems += _hybrid_problems(model)
    if getattr(model, "mtp_process", False) and not getattr(config, "mtp_num_layers", None):
        problems.append("multi-token prediction layers")
    if problems:
        raise UserError("unsupported model: " + "; ".join(problems))


def hybrid_pattern_of(model) -> str:
    """The layer pattern of a `MambaModel` (all stages): its override pattern, which megatron checked
    when it built the model, or the one it allocated from the ratios."""
    return model.hybrid_override_pattern or layer_pattern(model, model.config.num_layers)


def layer_pattern(holder, num_layers: int) -> str:
    """The layer pattern megatron's Mamba stack builds from the `hybrid_override_pattern`,
    `hybrid_attention_ratio` and `hybrid_mlp_ratio` of `holder` (a `MambaModel`, Megatron-LM's args,
    NeMo 2's SSM config; megatron's defaults where it lacks one): the override, checked against the
    ratios, or the pattern megatron allocates from the ratios alone."""
    from megatron.core.ssm.mamba_hybrid_layer_allocation import allocate_layers

    settings = {"hybrid_attention_ratio": getattr(holder, "hybrid_attention_ratio", 0.0),
                "hybrid_mlp_ratio": getattr(holder, "hybrid_mlp_ratio", 0.0),
                "hybrid_override_pattern": getattr(holder, "hybrid_override_pattern", None)}
    try:
        return "".join(allocate_layers(num_layers, *settings.values()))
    except (AssertionError, ValueError) as err:
        named = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        reason = str(err) or "a ratio outside [0, 1], or both summing past 1"
        raise UserError(f"megatron builds no {num_layers}-layer hybrid from {named}: {reason}") from None


def _hybrid_problems(model) -> list[str]:
    """What in a `MambaModel` nemo-minitron cannot prune or convert: layer kinds beyond Mamba,
    attention and MLP (MoE layers, "E"), and Mamba mixers unlike Nemotron-H's."""
    problems = []
    others = sorted(set(hybrid_pattern_of(model)) - set(LAYER_SYMBOLS))
    if others:
        problems.append(f"hybrid layers {others} (supported: {LAYER_SYMBOLS})")
    # every mixer is built from the same spec and config: this stage's first one tells
    mixer = next((layer.mixer for layer in model.decoder.layers if hasattr(layer, "mixer")), None)
    if mixer is not None:
        settings = {"D_has_hdim": (mixer.D_has_hdim, False), "rmsnorm": (mixer.rmsnorm, True),
                    "norm_before_gate": (mixer.norm_before_gate, False), "d_conv": (mixer.d_conv, MAMBA_CONV_KERNEL),
                    "conv1d bias": (mixer.conv1d.bias is not None, True)}
        problems += [f"a Mamba mixer with {key}={have} (supported: {want})" for key, (have, want) in settings.items()
                     if have != want]
    return problems


def moe_problems(config) -> list[str]:
    """The MoE settings of `config` (a `TransformerConfig`, or any object with its field names, such
    as NeMo 2's model config) that no supported family has (each as the field = value)."""
    wanted = {
        "moe_layer_freq": 1,  # every layer an MoE layer
        "moe_router_score_function": "softmax",
        "moe_router_enable_expert_bias": False,
        "moe_router_num_groups": None,  # group-limited routing
        "moe_expert_capacity_factor": None,  # token dropping
        "moe_apply_probs_on_input": False,
        "moe_router_topk_scaling_factor": None,
        "moe_input_jitter_eps": None,
    }
    problems = [f"{key}={getattr(config, key)!r} (supported: {value!r})" for key, value in wanted.items()
                if getattr(config, key, value) != value]
    if (getattr(config, "moe_shared_expert_intermediate_size", None) is not None
            and not getattr(config, "moe_shared_expert_gate", False)):
        problems.append("a shared expert without its gate (moe_shared_expert_gate=False)")
    return problems


def _rope_scaling_factor(model) -> float | None:
    """The Llama-3.1 rope-scaling factor megatron applied to the rotary frequencies (None: off).
    GPTModel keeps only the on/off switch; the lowest frequency is divided by exactly the factor."""
    if not model.rotary_scaling:
        return None
    inv_freq = model.rotary_pos_emb.inv_freq.double()
    dim = inv_freq.numel() * 2
    unscaled = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return round(float(unscaled[-1] / inv_freq[-1].cpu()), 3)  # the float32 frequencies blur the 7th digit


def arch_of(model) -> ModelArch:
    """The `ModelArch` of a megatron-core GPTModel (any TP/PP stage; wrappers are looked through)."""
    model = unwrap_model(model)
    _check_supported(model)
    config = model.config
    identity: dict[str, Any] = dict(_IDENTITY.get(model, {}))
    hybrid = is_hybrid_model(model)
    family = _family(config, hybrid)
    remembered = identity.get("family")
    if remembered and computes_alike(remembered, family):
        family = remembered  # e.g. Mistral, which computes like Llama
    common = dict(vocab_size=model.vocab_size, max_position_embeddings=model.max_sequence_length,
                  tie_embeddings=bool(model.share_embeddings_and_output_weights),
                  bos_token_id=identity.get("bos_token_id"), eos_token_id=identity.get("eos_token_id"))
    if hybrid:
        return ModelArch(**arch_fields(config, family), **common, hybrid_pattern=hybrid_pattern_of(model))
    return ModelArch(
        **arch_fields(config, family),
        **common,
        rope_theta=float(model.rotary_base),
        rope_scaling_factor=_rope_scaling_factor(model),
        rotary_percent=float(model.rotary_percent),
    )


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is blocked.

    Passed explicitly because megatron's default causal mask is built on "cuda".
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
