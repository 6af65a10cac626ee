"""A model's Hugging Face config, both ways: `arch_from_hf` reads the `ModelArch` of a transformers
config (or its config.json dict) of a supported family and refuses what nemo-minitron would not
compute the same (biases on o_proj or the MLP, another activation, a sliding window shorter than the
positions, rope scaling other than Llama 3.1's, MoE configs with dense layers); `to_hf` writes the
config object of the family's class (`export_family`: Llama with hidden % heads != 0 goes out as
Mistral). The families' names and classes come from `families.FAMILIES`; `bridge.py` maps the
weights.
"""

from __future__ import annotations

from typing import Any

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import LAYER_SYMBOLS, MAMBA_CONV_KERNEL, ModelArch
from nemo_minitron.models.families import FAMILIES, family_attention

# megatron's RotaryEmbedding hard-codes these Llama-3.1 rope-scaling constants; only `factor` is
# configurable, so checkpoints with other values are refused rather than silently changed.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# The sizes every supported Hugging Face config states (the rest have defaults; a hybrid's layer
# count is its pattern's length).
_HF_SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
# A hybrid's layer kinds as NemotronH configs name them (transformers 5's `layers_block_type`, the
# remote code's names before it) -> megatron's pattern symbols; "E" (MoE layers) is not supported.
_HF_LAYER_SYMBOLS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-",
                     "moe": "E"}
# Settings of a NemotronH config that megatron-core's Mamba layers fix: key -> the only value supported.
_HF_HYBRID_FIXED = {"conv_kernel": MAMBA_CONV_KERNEL, "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False,
                    "mamba_hidden_act": "silu", "residual_in_fp32": False, "num_nextn_predict_layers": 0}


def arch_from_hf(hf: Any) -> ModelArch:
    """The `ModelArch` of a transformers config object of a supported family (or its dict)."""
    cfg = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(
            f"unsupported architecture model_type={model_type!r}: nemo-minitron imports "
            f"{sorted(FAMILIES)} checkpoints"
        )
    family = FAMILIES[model_type]
    missing = [key for key in _HF_SIZE_KEYS if key not in cfg and not (family.hybrid and key == "num_hidden_layers")]
    if missing:
        raise UserError(f"the {model_type} config lacks {', '.join(missing)}: not a complete Hugging Face config.json")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        # (Qwen2's q/k/v biases are not this switch: its class always has them, and no o_proj bias.)
        raise UserError("attention_bias / mlp_bias checkpoints are not supported (a bias on o_proj or the MLP)")
    act = family.hf_act_key
    if cfg.get(act, family.hf_act) != family.hf_act:
        raise UserError(f"{act}={cfg.get(act)!r} is not supported for {model_type} "
                         f"(nemo-minitron builds {family.activation} from {act}={family.hf_act!r})")
    window, positions = _sliding_window(cfg), cfg.get("max_position_embeddings", 4096)
    if window and window < positions:
        raise UserError(f"sliding_window={window} is shorter than max_position_embeddings={positions} (e.g. Mistral "
                        f"7B v0.1): nemo-minitron attends to the whole sequence, so it would not compute this model "
                        f"beyond {window} tokens")
    heads = cfg["num_attention_heads"]
    rope_factor = None if family.hybrid else _llama3_rope_factor(cfg)
    moe = _hf_moe_fields(cfg) if family.is_moe else {}
    hybrid = _hf_hybrid_fields(cfg) if family.hybrid else {}
    eos = cfg.get("eos_token_id")
    return ModelArch(
        num_layers=len(hybrid["hybrid_pattern"]) if hybrid else cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=float(_rope_theta(cfg)),
        rope_scaling_factor=rope_factor,
        norm_eps=cfg.get(family.hf_norm_eps, 1e-5),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        family=model_type,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        rotary_percent=float(_partial_rotary_factor(cfg, family.hf_rotary_percent)),
        **family_attention(model_type),
        **moe,
        **hybrid,
    )


def _hf_hybrid_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `ModelArch` hybrid fields of a NemotronH config; refuses what megatron-core's hybrid
    layers would compute otherwise, naming the key."""
    for key, supported in _HF_HYBRID_FIXED.items():
        if key in cfg and cfg[key] != supported:
            raise UserError(f"{cfg['model_type']} with {key}={cfg[key]!r} is not supported: megatron-core's hybrid "
                            f"layers have {key}={supported!r}")
    low, high = (_json_float(v) for v in cfg.get("time_step_limit") or (0.0, float("inf")))
    if (low, high) != (0.0, float("inf")):
        raise UserError(f"time_step_limit={cfg['time_step_limit']} is not supported: megatron-core's Mamba mixer "
                        f"does not clamp the time step (0.0, inf)")
    kinds = cfg.get("layers_block_type")
    pattern = "".join(_HF_LAYER_SYMBOLS.get(kind, "?") for kind in kinds) if kinds else cfg.get("hybrid_override_pattern")
    if not pattern or set(pattern) - set(LAYER_SYMBOLS):
        raise UserError(f"{cfg['model_type']} layers {kinds or pattern!r}: supported are Mamba, attention and MLP "
                        f"layers ({sorted(k for k, v in _HF_LAYER_SYMBOLS.items() if v in LAYER_SYMBOLS)}); MoE "
                        f"layers are not")
    return {"hybrid_pattern": pattern, "mamba_num_heads": cfg["mamba_num_heads"],
            "mamba_head_dim": cfg["mamba_head_dim"], "mamba_num_groups": cfg["n_groups"],
            "mamba_state_dim": cfg["ssm_state_size"]}


def _json_float(value: Any) -> float:
    """A float of config.json: a number, a string ("Infinity") or transformers 5's encoding of a
    non-finite one ({"__float__": "Infinity"})."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def export_family(arch: ModelArch) -> str:
    """The family whose Hugging Face class export-hf writes: this one's, except for a Llama whose
    hidden size is not a multiple of its heads (e.g. hidden 448 with 9 heads of 64 after width
    pruning). transformers >= 5 refuses such a LlamaConfig whatever `head_dim` says, so it goes
    out as Mistral, which computes the same (with `sliding_window` null) and takes any head_dim."""
    if arch.family == "llama" and arch.hidden_size % arch.num_attention_heads:
        return "mistral"
    return arch.family


def export_notes(arch: ModelArch) -> list[str]:
    """One line for each way export-hf cannot write this architecture as its family's own HF
    class in every transformers from 4.57 on; empty for the published models. The prune planner
    logs them, so they show before a distillation run is spent."""
    notes = []
    if export_family(arch) != arch.family:
        notes.append(
            f"hidden_size={arch.hidden_size} is not a multiple of num_attention_heads={arch.num_attention_heads}, "
            f"which transformers >= 5 refuses in a LlamaConfig: export-hf writes this model as "
            f"MistralForCausalLM (model_type mistral), which computes the same"
        )
    if arch.family == "nemotron" and arch.rope_scaling_factor is not None:
        notes.append(
            f"rope_scaling_factor={arch.rope_scaling_factor}: transformers 4.x's NemotronForCausalLM ignores "
            f"rope scaling, so the exported model gives other logits there (transformers >= 5 applies it)"
        )
    if arch.family == "qwen2_moe" and arch.kv_channels * arch.num_attention_heads != arch.hidden_size:
        notes.append(
            f"kv_channels={arch.kv_channels} x num_attention_heads={arch.num_attention_heads} != hidden_size="
            f"{arch.hidden_size}: transformers 4.x's Qwen2MoeForCausalLM sizes heads as hidden_size / "
            f"num_attention_heads and refuses the export (transformers >= 5 reads head_dim)"
        )
    return notes


def rope_fields(arch: ModelArch) -> dict[str, Any]:
    """The rotary settings of config.json in both forms transformers reads: `rope_parameters`
    (5.x) and `rope_theta` + `rope_scaling` (4.x; Nemotron's `partial_rotary_factor` beside
    them), which 4.x needs or it falls back to theta 10000. transformers 5 prefers a non-null
    `rope_scaling` to `rope_parameters` and fills its theta from `rope_theta`, so both forms
    carry the same llama3 scaling (the constants megatron hard-codes)."""
    scaling = None
    if arch.rope_scaling_factor is not None:
        scaling = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE}
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": arch.rope_theta}
    fields: dict[str, Any] = {"rope_parameters": parameters, "rope_theta": arch.rope_theta, "rope_scaling": scaling}
    if arch.family == "nemotron":  # transformers' Nemotron reads it unconditionally
        parameters["partial_rotary_factor"] = fields["partial_rotary_factor"] = arch.rotary_percent
    return fields


def to_hf(arch: ModelArch):
    """A transformers config object of the `export_family`'s class for `arch`."""
    import transformers

    family = FAMILIES[export_family(arch)]
    layers = _hf_hybrid_kwargs(arch) if arch.is_hybrid else dict(num_hidden_layers=arch.num_layers)
    kwargs: dict[str, Any] = dict(
        **layers,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        vocab_size=arch.vocab_size,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_embeddings,
        bos_token_id=arch.bos_token_id,
        eos_token_id=arch.eos_token_id,
        torch_dtype="float32",
    )
    kwargs[family.hf_norm_eps] = arch.norm_eps
    kwargs[family.hf_act_key] = family.hf_act
    if family.hf_window_default:  # megatron attends to the whole sequence; these configs default to a
        kwargs["sliding_window"] = None  # 4096 window (Qwen's switched off by default)
    if arch.is_moe:
        kwargs.update(_hf_moe_kwargs(arch))
    config = getattr(transformers, family.hf_config)(**kwargs)
    if not arch.is_hybrid:  # a hybrid's attention has no rotary
        _set_hf_rope(config, rope_fields(arch))
    config.architectures = [family.hf_class]
    return config


def _hf_hybrid_kwargs(arch: ModelArch) -> dict[str, Any]:
    """The layer pattern and Mamba settings of a NemotronH config (inverse of `_hf_hybrid_fields`).
    The pattern goes in as `hybrid_override_pattern`, which every transformers with NemotronH
    takes (5.x turns it into `layers_block_type`)."""
    return dict(hybrid_override_pattern=arch.hybrid_pattern, mamba_num_heads=arch.mamba_num_heads,
                mamba_head_dim=arch.mamba_head_dim, n_groups=arch.mamba_num_groups,
                ssm_state_size=arch.mamba_state_dim, **_HF_HYBRID_FIXED)


def _hf_moe_kwargs(arch: ModelArch) -> dict[str, Any]:
    """The MoE settings of the family's HF config (inverse of `_hf_moe_fields`)."""
    kwargs: dict[str, Any] = {"num_experts_per_tok": arch.moe_router_topk}
    if arch.family == "mixtral":
        kwargs["num_local_experts"] = arch.num_moe_experts
        return kwargs
    kwargs.update(num_experts=arch.num_moe_experts, moe_intermediate_size=arch.moe_ffn_hidden_size,
                  norm_topk_prob=not arch.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
    if arch.family == "qwen2_moe":
        kwargs["shared_expert_intermediate_size"] = arch.moe_shared_expert_intermediate_size
    return kwargs


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window some layer of an HF config really applies (None: every layer attends
    to the whole sequence). Mistral windows every layer when `sliding_window` is set; Qwen2/Qwen3
    only with `use_sliding_window` true (false in the published models, whose `sliding_window` is
    then unused), and only in the layers from `max_window_layers` on (transformers' `layer_types`)."""
    window = cfg.get("sliding_window")
    if not window or not cfg.get("use_sliding_window", True):
        return None
    if not FAMILIES[cfg["model_type"]].hf_window_switch:
        return window
    if isinstance(cfg.get("layer_types"), list):
        return window if "sliding_attention" in cfg["layer_types"] else None
    if "max_window_layers" in cfg and cfg["max_window_layers"] >= cfg["num_hidden_layers"]:
        return None
    return window


def _hf_moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `ModelArch` MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE HF config. Refuses configs
    with dense layers among the MoE ones (megatron's `moe_layer_freq`, not supported here)."""
    model_type = cfg["model_type"]
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise UserError(f"{model_type} with dense MLP layers (mlp_only_layers={cfg.get('mlp_only_layers')}, "
                        f"decoder_sparse_step={cfg.get('decoder_sparse_step')}) is not supported: every layer must "
                        f"be a mixture-of-experts layer")
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")  # transformers 5 saves Qwen's under both names
    fields = {"num_moe_experts": experts, "moe_router_topk": cfg["num_experts_per_tok"]}
    if model_type == "mixtral":
        return fields | {"moe_ffn_hidden_size": cfg["intermediate_size"]}
    fields |= {"moe_ffn_hidden_size": cfg["moe_intermediate_size"],
               "moe_router_pre_softmax": not cfg.get("norm_topk_prob", False)}
    if model_type == "qwen2_moe":
        fields["moe_shared_expert_intermediate_size"] = cfg["shared_expert_intermediate_size"]
    return fields


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return params.get("rope_theta") or cfg.get("rope_theta") or 10000.0


def _partial_rotary_factor(cfg: dict[str, Any], default: float) -> float:
    params = cfg.get("rope_parameters") or {}
    return params.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or default


def _llama3_rope_factor(cfg: dict[str, Any]) -> float | None:
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    for key, expected in MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, expected)) != expected:
            raise UserError(
                f"rope_scaling.{key}={scaling[key]} is not supported: megatron-core fixes it to {expected}"
            )
    return float(scaling["factor"])


def _set_hf_rope(config: Any, fields: dict[str, Any]) -> None:
    """Set `rope_fields` on a config object in the form its transformers reads."""
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = fields["rope_parameters"]
    else:
        for key, value in fields.items():
            if key != "rope_parameters":
                setattr(config, key, value)
