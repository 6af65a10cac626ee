"""Build the megatron-core `GPTModel` for a `ModelArch` on the current parallel layout."""

from __future__ import annotations

import importlib.util

import torch

from nemo_minitron.models.config import ModelArch


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def layer_spec(normalization: str, use_te: bool | None = None):
    """TE layer spec in the GPU container (fused norm+linear), the local spec everywhere else.
    (The TE spec takes the norm kind from the TransformerConfig; the local spec needs it here.)"""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization=normalization)


def build_gpt_model(
    arch: ModelArch,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
):
    """The stage of `arch` that this rank holds under the initialised TP/PP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = arch.transformer_config(tp=tp, pp=pp, params_dtype=params_dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch.normalization, use_te),
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
    model.arch = arch
    if torch.cuda.is_available():
        model.cuda()
    return model


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, s, s] boolean mask, True where attention is blocked.

    Passed explicitly because megatron's default causal mask is built on "cuda".
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
