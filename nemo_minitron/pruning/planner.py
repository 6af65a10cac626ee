"""Parameter counting and the published Minitron architectures (docs/design.md section 7).

Three independent counts agree (tested): the closed form `ModelArch.num_parameters()`, the sum of
the global tensor shapes the bridge expects, and a megatron `GPTModel` built on the meta device
(no weights allocated, so Llama-3.1-8B or Mistral-NeMo-12B count in seconds on a laptop).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.pruning.spec import PruneSpec
from nemo_minitron.models.hf_config import export_notes

log = logging.getLogger("nemo_minitron")

_EMBEDDING_NAMES = ("embedding.word_embeddings.weight", "output_layer.weight")

PUBLISHED_TEACHERS: dict[str, ModelArch] = {
    "llama-3.1-8b": ModelArch(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling_factor=8.0, norm_eps=1e-5, tie_embeddings=False, family="llama",
    ),
    "mistral-nemo-12b": ModelArch(
        num_layers=40, hidden_size=5120, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=131072, max_position_embeddings=1024000, rope_theta=1000000.0,
        norm_eps=1e-5, tie_embeddings=False, family="mistral",
    ),
    # Nemotron-4: LayerNorm with bias, squared-ReLU MLP (no gate), rotary on half of each head.
    "nemotron-4-15b": ModelArch(
        num_layers=32, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48, num_query_groups=8,
        kv_channels=128, vocab_size=256000, max_position_embeddings=4096, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, family="nemotron", rotary_percent=0.5,
    ),
    # Qwen2.5: QKV biases; Qwen3: per-head query/key RMSNorms, head_dim 128 set apart from hidden/heads.
    "qwen2.5-7b": ModelArch(
        num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
        kv_channels=128, vocab_size=152064, max_position_embeddings=131072, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=False, family="qwen2", qkv_bias=True,
    ),
    "qwen3-8b": ModelArch(
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=False, family="qwen3", qk_norm=True,
    ),
    # Qwen3-30B-A3B: 48 MoE layers of 128 experts (FFN 768, top-8, renormalised), 30.5B total, 3.3B active.
    "qwen3-30b-a3b": ModelArch(
        num_layers=48, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4,
        kv_channels=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, norm_eps=1e-6,
        tie_embeddings=False, family="qwen3_moe", qk_norm=True, num_moe_experts=128, moe_router_topk=8,
        moe_ffn_hidden_size=768,
    ),
    # Nemotron-H: Mamba-2, attention (no rotary) and squared-ReLU MLP layers in a pattern; 28 Mamba
    # layers of 128 heads x 80 channels in 8 SSM groups with 128 states, 6 attention, 28 MLP.
    "nemotron-nano-12b-v2": ModelArch(
        num_layers=62, hidden_size=5120, ffn_hidden_size=20480, num_attention_heads=40, num_query_groups=8,
        kv_channels=128, vocab_size=131072, max_position_embeddings=131072, norm_eps=1e-5, tie_embeddings=False,
        family="nemotron_h", hybrid_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
        mamba_num_heads=128, mamba_head_dim=80, mamba_num_groups=8, mamba_state_dim=128,
    ),
}
# Minitron-4B is pruned from Minitron-8B, not from the 15B (the paper's iterative prune + distill).
PUBLISHED_TEACHERS["minitron-8b"] = PUBLISHED_TEACHERS["nemotron-4-15b"].replace(hidden_size=4096, ffn_hidden_size=16384)


@dataclass(frozen=True)
class Recipe:
    """A published pruned model: its teacher, the prune that makes it, its reported size."""

    teacher: str
    spec: PruneSpec
    published_params: str  # as the model card / paper reports it


PUBLISHED_RECIPES: dict[str, Recipe] = {
    "llama-3.1-minitron-4b-width": Recipe("llama-3.1-8b", PruneSpec(hidden_size=3072, ffn_hidden_size=9216), "4.51B"),
    "llama-3.1-minitron-4b-depth": Recipe("llama-3.1-8b", PruneSpec(num_layers=16), "4.54B"),
    "mn-minitron-8b": Recipe("mistral-nemo-12b", PruneSpec(hidden_size=4096, ffn_hidden_size=11520), "8.41B"),
    # Model cards: Minitron-8B-Base hidden 4096 / 48 heads / FFN 16384; Minitron-4B-Base hidden 3072 /
    # 32 heads / FFN 9216; both 32 layers, 8 KV groups, head_dim 128. The cards say only "8B" and "4B".
    "minitron-8b": Recipe("nemotron-4-15b", PruneSpec(hidden_size=4096, ffn_hidden_size=16384), "8B"),
    "minitron-4b": Recipe("minitron-8b", PruneSpec(hidden_size=3072, ffn_hidden_size=9216, num_attention_heads=32), "4B"),
    # Model Optimizer's parameter-budget search from Qwen3-8B to 6B picks 30 layers, hidden 3584, FFN 11776.
    "qwen3-8b-to-6b": Recipe("qwen3-8b", PruneSpec(num_layers=30, hidden_size=3584, ffn_hidden_size=11776), "6B"),
    # Qwen3-30B-A3B with 96 of its 128 experts per layer (reported: MMLU 0.740 without retraining vs 0.787);
    # the source gives no size, 23.28B is this planner's count.
    "qwen3-30b-a3b-96-experts": Recipe("qwen3-30b-a3b", PruneSpec(num_moe_experts=96), "23.28B"),
    # Nemotron-Nano-9B-v2 (arXiv 2508.14444): 62 -> 56 layers, hidden 4480, FFN 15680; the card says "9B",
    # this planner counts 8.89B (the teacher 12.31B). The dropped layers leave the 9B's published pattern.
    "nemotron-nano-9b-v2": Recipe("nemotron-nano-12b-v2", PruneSpec(drop_layers=[7, 8, 23, 24, 48, 52], hidden_size=4480,
                                                                    ffn_hidden_size=15680), "9B"),
}


def count_from_shapes(arch: ModelArch) -> dict[str, int]:
    """Total and non-embedding parameters from the global tensor shapes of `arch`."""
    shapes = bridge.expected_global_shapes(arch)
    total = sum(math.prod(s) for s in shapes.values())
    embedding = sum(math.prod(s) for name, s in shapes.items() if name in _EMBEDDING_NAMES)
    return {"total": total, "non_embedding": total - embedding}


def count_on_meta(arch: ModelArch) -> int:
    """Parameters of the megatron GPTModel for `arch`, built on the meta device.

    Needs an initialised TP=1 x PP=1 layout (`parallel.initialize()`), where this rank's model is
    the whole model, in a CPU-only process; tied embeddings are one shared parameter and count once.
    """
    from megatron.core import parallel_state as ps

    from nemo_minitron.models.gpt import build_gpt_model

    if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("count_on_meta needs a tp=1 pp=1 layout (it counts the whole model on one rank)")
    if torch.cuda.is_available():
        # build_gpt_model initialises on the GPU there, which the meta device context does not cover.
        raise RuntimeError("count_on_meta runs in CPU-only processes; use ModelArch.num_parameters() on a GPU")
    with torch.device("meta"):
        model = build_gpt_model(arch, use_te=False)
    return sum(p.numel() for p in model.parameters())


def plan(teacher: ModelArch, spec: PruneSpec, tp: int = 1, pp: int = 1, ep: int = 1) -> dict:
    """Architectures and parameter counts before and after `spec`, without touching weights, and
    what a Hugging Face export of the student will not hold as its family's class (logged as a
    warning here, before any pruning or distillation; `hf_config.export_notes`)."""
    target = spec.target_arch(teacher, tp, pp, ep)
    before, after = teacher.num_parameters(), target.num_parameters()
    notes = export_notes(target)
    for note in notes:
        log.warning("student %s: %s", target.shape(), note)
    result = {
        "teacher": teacher.shape() | {"parameters": before},
        "student": target.shape() | {"parameters": after},
        "kept_fraction": {k: after[k] / before[k] for k in before},
        "hf_export": notes,
    }
    if teacher.is_hybrid:  # the kinds decide the size; which layers go may wait for the depth scores
        result["layers_per_kind"] = {"teacher": dict(Counter(teacher.layer_types)),
                                     "student": dict(Counter(target.layer_types))}
    return result


def published_student(name: str) -> tuple[ModelArch, ModelArch]:
    """(teacher, student) architectures of a published recipe."""
    if name not in PUBLISHED_RECIPES:
        raise UserError(f"unknown recipe {name!r}: one of {sorted(PUBLISHED_RECIPES)}")
    recipe = PUBLISHED_RECIPES[name]
    teacher = PUBLISHED_TEACHERS[recipe.teacher]
    return teacher, recipe.spec.target_arch(teacher)
