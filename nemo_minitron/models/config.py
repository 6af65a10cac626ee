"""The architecture of a Llama-, Qwen-, Nemotron- or mixture-of-experts-family decoder, as one
small typed config.

`ModelArch` is what a checkpoint records (`model_config.json`), what pruning edits and what the
planner counts. It converts to a megatron `TransformerConfig` for a given parallel layout and to
and from a Hugging Face `LlamaConfig`/`MistralConfig`/`NemotronConfig`/`Qwen2Config`/`Qwen3Config`/
`MixtralConfig`/`Qwen2MoeConfig`/`Qwen3MoeConfig` (the bridge uses these).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_minitron.errors import UserError, read_json
# The keys that give a decoder its shape: what pruning changes, reports and plans compare.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
# The shape keys of mixture-of-experts layers (megatron-core's names; None in a dense model, and the
# shared expert's None in a family without one).
MOE_SHAPE_KEYS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
# What a checkpoint records beside the computation: the family name (Llama and Mistral compute
# alike) and the special token ids that HF configs carry.
IDENTITY_KEYS = ("family", "bos_token_id", "eos_token_id")

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "nemotron": "NemotronForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# What each family computes: Llama and Mistral are RMSNorm + SwiGLU + full rotary; Nemotron-4 is
# LayerNorm (with bias, "1p" zero-centred gamma in HF files) + squared-ReLU MLP + rotary on half of
# each head; Qwen2 and Qwen3 are Llama layers with the attention extras of FAMILY_ATTENTION.
# (normalization, activation, HF `hidden_act`)
FAMILY_LAYERS = {
    "llama": ("RMSNorm", "swiglu", "silu"),
    "mistral": ("RMSNorm", "swiglu", "silu"),
    "nemotron": ("LayerNorm", "squared_relu", "relu2"),
    "qwen2": ("RMSNorm", "swiglu", "silu"),
    "qwen3": ("RMSNorm", "swiglu", "silu"),
    "mixtral": ("RMSNorm", "swiglu", "silu"),
    "qwen2_moe": ("RMSNorm", "swiglu", "silu"),
    "qwen3_moe": ("RMSNorm", "swiglu", "silu"),
}
# The attention extras of a family, as (qkv_bias, qk_norm); a family not listed has neither.
# Qwen2 adds a bias to the q, k and v projections (not to o_proj); Qwen3 applies an RMSNorm over
# head_dim to every query and key head before rotary (`q_norm` / `k_norm`, one [d] weight each).
FAMILY_ATTENTION = {"qwen2": (True, False), "qwen3": (False, True), "qwen2_moe": (True, False), "qwen3_moe": (False, True)}
# The mixture-of-experts families, each with whether its layers add a gated shared expert. Every
# layer's MLP is an MoE layer (HF `decoder_sparse_step` 1 and no `mlp_only_layers`): `num_moe_experts`
# routed SwiGLU experts of `moe_ffn_hidden_size`, of which a [experts, hidden] router picks
# `moe_router_topk` per token. Mixtral and Qwen3-MoE weight the picked experts by the softmax over
# the picked logits (HF `norm_topk_prob`); Qwen2-MoE by the softmax over all experts
# (`moe_router_pre_softmax`), and adds sigmoid(x . g) times a shared SwiGLU expert of
# `moe_shared_expert_intermediate_size`.
FAMILY_MOE = {"mixtral": False, "qwen2_moe": True, "qwen3_moe": False}


def family_of(normalization: str | None, activation: str | None, qkv_bias: bool = False, qk_norm: bool = False,
              moe: bool = False, shared_expert: bool = False) -> str | None:
    """The first family (so Llama before Mistral) whose layers are `normalization` + `activation`, as a
    framework config names them ("RMSNorm", "swiglu"), with these attention extras and MoE layers
    (with or without a shared expert); None when no family has them."""
    return next((name for name, (norm, act, _) in FAMILY_LAYERS.items()
                 if (norm, act) == (normalization, activation)
                 and FAMILY_ATTENTION.get(name, (False, False)) == (qkv_bias, qk_norm)
                 and (name in FAMILY_MOE) == moe and FAMILY_MOE.get(name, False) == shared_expert), None)


def no_family_problem(normalization: str, activation: str, named: str, spellings: tuple[str, str, str]) -> str:
    """The problem phrase for `normalization` + `activation` layers with the extras `named` (as the
    source lists them) that `family_of` matches to no family; `spellings` are the source's names for
    QKV biases, query/key norms and experts."""
    qkv_bias, qk_norm, experts = spellings
    return (f"{normalization} + {activation} layers with {named}, which no Hugging Face family has (RMSNorm + swiglu "
            f"take {qkv_bias} (Qwen2) or {qk_norm} (Qwen3); with {experts}, {qk_norm} (Qwen3-MoE), {qkv_bias} with a "
            f"gated shared expert (Qwen2-MoE) or neither (Mixtral))")


def computes_alike(family: str, other: str) -> bool:
    """Whether two families' layers compute the same (Llama and Mistral do; Qwen3 and Qwen3-MoE do not)."""
    return (FAMILY_LAYERS[family][:2] == FAMILY_LAYERS[other][:2] and family_attention(family) == family_attention(other)
            and FAMILY_MOE.get(family) == FAMILY_MOE.get(other))


def family_of_layers(normalization: str | None, activation: str | None) -> str | None:
    """The plain family (no attention extras, no experts) whose layers are `normalization` + `activation`."""
    return family_of(normalization, activation)


def family_attention(family: str) -> dict[str, bool]:
    """The `ModelArch` attention-extra fields of `family`: {"qkv_bias": .., "qk_norm": ..}."""
    return dict(zip(("qkv_bias", "qk_norm"), FAMILY_ATTENTION.get(family, (False, False))))

# megatron's RotaryEmbedding hard-codes these Llama-3.1 rope-scaling constants; only `factor` is
# configurable, so checkpoints with other values are refused rather than silently changed.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# The sizes every supported Hugging Face config states (the rest have defaults).
_HF_SIZE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _same_setting(mine: Any, other: Any) -> bool:
    if isinstance(mine, float) or isinstance(other, float):
        return isinstance(mine, (int, float)) and isinstance(other, (int, float)) and math.isclose(mine, other, rel_tol=1e-6)
    return mine == other


@dataclass
class ModelArch:
    """A decoder with rotary GQA attention: RMSNorm + SwiGLU (Llama, Mistral; Qwen2 with QKV
    biases, Qwen3 with per-head query/key norms) or LayerNorm + squared ReLU with partial rotary
    (Nemotron-4); optionally tied embeddings."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    family: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    rotary_percent: float = 1.0     # fraction of each head's channels that rotary rotates
    qkv_bias: bool = False          # a bias on the q, k and v projections (Qwen2)
    qk_norm: bool = False           # an RMSNorm over head_dim on every query and key head (Qwen3)
    num_moe_experts: int | None = None  # routed experts per layer (MoE families; None: a dense MLP)
    moe_router_topk: int | None = None  # experts each token goes to
    moe_ffn_hidden_size: int | None = None  # FFN width of every routed expert
    moe_shared_expert_intermediate_size: int | None = None  # the gated shared expert's width (Qwen2-MoE)
    moe_router_pre_softmax: bool = False  # weights = softmax over all experts, not renormalised over the top k

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in (*SHAPE_KEYS, "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise UserError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.family not in HF_ARCHITECTURES:
            raise UserError(f"model.family={self.family!r} is not one of {sorted(HF_ARCHITECTURES)}")
        if self.rotary_percent != 1.0 and self.family != "nemotron":
            raise UserError(f"model.rotary_percent={self.rotary_percent}: partial rotary is a Nemotron feature; "
                             f"{self.family} rotates whole heads (1.0)")
        if not 0 < self.rotary_percent <= 1 or (self.kv_channels * self.rotary_percent) % 2:
            raise UserError(f"model.rotary_percent={self.rotary_percent} must be in (0, 1] and rotate an even "
                             f"number of the {self.kv_channels} head channels")
        for key, want in family_attention(self.family).items():
            if getattr(self, key) != want:
                raise UserError(f"model.{key}={getattr(self, key)} does not fit model.family={self.family!r}, whose "
                                f"{key} is {want} (QKV biases are the qwen2 family's, query/key norms qwen3's)")
        self._validate_moe()

    def _validate_moe(self) -> None:
        """The MoE fields: all set (the shared expert only for Qwen2-MoE) in an MoE family, none in
        a dense one; 1 <= top-k <= experts."""
        if self.family not in FAMILY_MOE:
            set_keys = [key for key in (*MOE_SHAPE_KEYS, "moe_router_topk") if getattr(self, key) is not None]
            if set_keys or self.moe_router_pre_softmax:
                raise UserError(f"model.{(set_keys or ['moe_router_pre_softmax'])[0]} is set but model.family="
                                f"{self.family!r} is dense: mixture-of-experts layers are the "
                                f"{sorted(FAMILY_MOE)} families'")
            return
        shared = FAMILY_MOE[self.family]
        required = ["num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size"]
        required += ["moe_shared_expert_intermediate_size"] if shared else []
        for key in required:
            if getattr(self, key) is None or getattr(self, key) < 1:
                raise UserError(f"model.{key} must be a positive integer in a {self.family} model, got "
                                f"{getattr(self, key)}")
        if not shared and self.moe_shared_expert_intermediate_size is not None:
            raise UserError(f"model.moe_shared_expert_intermediate_size is set but {self.family} has no shared "
                            f"expert (qwen2_moe has)")
        if self.moe_router_topk > self.num_moe_experts:
            raise UserError(f"model.moe_router_topk={self.moe_router_topk} exceeds model.num_moe_experts="
                            f"{self.num_moe_experts}: every token needs that many experts")
        if self.moe_router_topk == 1 and not self.moe_router_pre_softmax:
            raise UserError(f"model.moe_router_topk=1 with weights renormalised over the top k (every weight 1.0) "
                            f"is refused by megatron-core: keep at least 2 experts per token in {self.family}")
        if self.family == "mixtral" and self.moe_router_pre_softmax:
            raise UserError("model.moe_router_pre_softmax=true does not fit mixtral, which renormalises the "
                            "top-k weights")
        if self.family == "mixtral" and self.ffn_hidden_size != self.moe_ffn_hidden_size:
            raise UserError(f"model.ffn_hidden_size={self.ffn_hidden_size} must equal model.moe_ffn_hidden_size="
                            f"{self.moe_ffn_hidden_size} in mixtral, whose one intermediate_size is the experts'")

    @property
    def is_moe(self) -> bool:
        """Every layer's MLP is a mixture-of-experts layer."""
        return self.num_moe_experts is not None

    @property
    def normalization(self) -> str:
        """RMSNorm (a weight per norm) or LayerNorm (a weight and a bias), fixed by the family."""
        return FAMILY_LAYERS[self.family][0]

    @property
    def activation(self) -> str:
        """swiglu (linear_fc1 = [gate; up]) or squared_relu (linear_fc1 = up), fixed by the family."""
        return FAMILY_LAYERS[self.family][1]

    @property
    def gated(self) -> bool:
        """SwiGLU: linear_fc1 holds a gate and an up projection per neuron."""
        return self.activation == "swiglu"

    @property
    def norm_params(self) -> tuple[str, ...]:
        """The parameters of every norm, each of hidden size."""
        return ("weight", "bias") if self.normalization == "LayerNorm" else ("weight",)

    @property
    def qkv_rows(self) -> int:
        """Rows of the fused linear_qkv (and of its bias): n_h q heads, n_g k and n_g v heads of d."""
        return (self.num_attention_heads + 2 * self.num_query_groups) * self.kv_channels

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """UserError naming the key to fix when this model cannot be split tp x pp (experts over ep)."""
        if self.num_query_groups % tp:
            raise UserError(
                f"tp={tp} does not divide num_query_groups={self.num_query_groups} "
                f"(num_attention_heads={self.num_attention_heads}): choose tp= among "
                f"{[d for d in range(1, self.num_query_groups + 1) if self.num_query_groups % d == 0]}"
            )
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size") if self.is_moe else ("ffn_hidden_size",):
            width = getattr(self, key)
            if width is not None and width % tp:  # experts split over expert-TP = TP
                raise UserError(f"tp={tp} does not divide {key}={width}: change tp=")
        if self.vocab_size % tp:
            # No vocab padding: padded logits would need masking in every loss; the published
            # vocabularies (49152, 128256, 131072, 256000) all split over 8 ranks.
            raise UserError(f"tp={tp} does not divide vocab_size={self.vocab_size}: change tp=")
        if self.num_layers % pp:
            raise UserError(f"pp={pp} does not divide num_layers={self.num_layers}: change pp=")
        if ep > 1 and not self.is_moe:
            raise UserError(f"ep={ep}: expert parallelism splits mixture-of-experts layers, and this {self.family} "
                            f"model is dense: use ep=1")
        if ep > 1 and self.num_moe_experts % ep:
            raise UserError(f"ep={ep} does not divide num_moe_experts={self.num_moe_experts}: change ep=")

    def check_positions(self, length: int, key: str) -> None:
        """UserError when sequences of `length` tokens (config key `key`) exceed the positions the
        model was trained for."""
        if length > self.max_position_embeddings:
            raise UserError(f"{key}={length} exceeds the model's max_position_embeddings="
                            f"{self.max_position_embeddings}: use at most that many tokens")

    def num_parameters(self) -> dict[str, int]:
        """Total and non-embedding parameter counts (tied embeddings counted once); for an MoE model
        also `active`, the parameters one token runs through (top-k of the routed experts)."""
        h, d = self.hidden_size, self.kv_channels
        attention = self.qkv_rows * h + h * self.num_attention_heads * d
        attention += self.qkv_rows * self.qkv_bias + 2 * d * self.qk_norm  # Qwen2 biases, Qwen3 q/k norms
        mlp = active_mlp = (3 if self.gated else 2) * self.ffn_hidden_size * h
        if self.is_moe:  # router [E, h] + E SwiGLU experts (+ the shared expert and its [1, h] gate)
            expert = 3 * self.moe_ffn_hidden_size * h
            shared = 3 * self.moe_shared_expert_intermediate_size * h + h if self.moe_shared_expert_intermediate_size else 0
            mlp = self.num_moe_experts * (h + expert) + shared
            active_mlp = self.num_moe_experts * h + self.moe_router_topk * expert + shared
        norm = h * len(self.norm_params)
        embedding = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        non_embedding = self.num_layers * (attention + mlp + 2 * norm) + norm
        counts = {"total": non_embedding + embedding, "non_embedding": non_embedding}
        if self.is_moe:
            counts["active"] = counts["total"] - self.num_layers * (mlp - active_mlp)
        return counts

    def differences(self, other: "ModelArch") -> list[str]:
        """`key=mine vs other` for every field that changes what the two models compute. Floats
        (norm epsilon, rotary base and scaling) are the same within a relative 1e-6: a value that
        went through float32 somewhere (a GGUF file, a config built in bf16 code) is the same setting."""
        return [f"{f.name}={getattr(self, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(self)
                if f.name not in IDENTITY_KEYS and not _same_setting(getattr(self, f.name), getattr(other, f.name))]

    def shape(self) -> dict[str, int]:
        """The shape keys, and the MoE ones a mixture-of-experts model has."""
        moe = {key: getattr(self, key) for key in MOE_SHAPE_KEYS if getattr(self, key) is not None}
        return {key: getattr(self, key) for key in SHAPE_KEYS} | moe

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> "ModelArch":
        """The architecture in the JSON file `path`; a UserError naming the file and the problem."""
        data = read_json(path, kind=None)  # from_dict says what a config that is not an object is
        try:
            return cls.from_dict(data)
        except UserError as err:
            raise UserError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelArch":
        """Checked field by field: known keys, required keys present, JSON types matching."""
        if not isinstance(data, dict):
            raise UserError(f"a model config is a JSON object, not {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(fields)
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        missing = [name for name, f in fields.items() if f.default is dataclasses.MISSING and name not in data]
        if missing:
            raise UserError(f"model config lacks the keys {missing}")
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if not _json_matches(value, hints[key]):
                raise UserError(f"model config key {key}={value!r} is not of type {_type_name(hints[key])}")
        return cls(**data)

    def replace(self, **changes: Any) -> "ModelArch":
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config -------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelArch":
        """From a transformers Llama/Mistral/Nemotron/Qwen2/Qwen3 config object (or its dict)."""
        cfg = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = cfg.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            raise UserError(
                f"unsupported architecture model_type={model_type!r}: nemo-minitron imports "
                f"{sorted(HF_ARCHITECTURES)} checkpoints"
            )
        missing = [key for key in _HF_SIZE_KEYS if key not in cfg]
        if missing:
            raise UserError(f"the {model_type} config lacks {', '.join(missing)}: not a complete Hugging Face config.json")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            # (Qwen2's q/k/v biases are not this switch: its class always has them, and no o_proj bias.)
            raise UserError("attention_bias / mlp_bias checkpoints are not supported (a bias on o_proj or the MLP)")
        _, activation, hidden_act = FAMILY_LAYERS[model_type]
        if cfg.get("hidden_act", hidden_act) != hidden_act:
            raise UserError(f"hidden_act={cfg.get('hidden_act')!r} is not supported for {model_type} "
                             f"(nemo-minitron builds {activation} from hidden_act={hidden_act!r})")
        window, positions = _sliding_window(cfg), cfg.get("max_position_embeddings", 4096)
        if window and window < positions:
            raise UserError(f"sliding_window={window} is shorter than max_position_embeddings={positions} (e.g. Mistral "
                            f"7B v0.1): nemo-minitron attends to the whole sequence, so it would not compute this model "
                            f"beyond {window} tokens")
        heads = cfg["num_attention_heads"]
        rope_factor = _llama3_rope_factor(cfg)
        moe = _hf_moe_fields(cfg) if model_type in FAMILY_MOE else {}
        eos = cfg.get("eos_token_id")
        return cls(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads") or heads,
            kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rope_theta=float(_rope_theta(cfg)),
            rope_scaling_factor=rope_factor,
            norm_eps=cfg.get("rms_norm_eps", cfg.get("norm_eps", 1e-5)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            family=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            # transformers' NemotronConfig defaults to rotating half of each head
            rotary_percent=float(_partial_rotary_factor(cfg, 0.5 if model_type == "nemotron" else 1.0)),
            **family_attention(model_type),
            **moe,
        )

    @property
    def hf_family(self) -> str:
        """The family whose Hugging Face class export-hf writes: this one's, except for a Llama whose
        hidden size is not a multiple of its heads (e.g. hidden 448 with 9 heads of 64 after width
        pruning). transformers >= 5 refuses such a LlamaConfig whatever `head_dim` says, so it goes
        out as Mistral, which computes the same (with `sliding_window` null) and takes any head_dim."""
        if self.family == "llama" and self.hidden_size % self.num_attention_heads:
            return "mistral"
        return self.family

    def hf_export_notes(self) -> list[str]:
        """One line for each way export-hf cannot write this architecture as its family's own HF
        class in every transformers from 4.57 on; empty for the published models. The prune planner
        logs them, so they show before a distillation run is spent."""
        notes = []
        if self.hf_family != self.family:
            notes.append(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}, "
                f"which transformers >= 5 refuses in a LlamaConfig: export-hf writes this model as "
                f"MistralForCausalLM (model_type mistral), which computes the same"
            )
        if self.family == "nemotron" and self.rope_scaling_factor is not None:
            notes.append(
                f"rope_scaling_factor={self.rope_scaling_factor}: transformers 4.x's NemotronForCausalLM ignores "
                f"rope scaling, so the exported model gives other logits there (transformers >= 5 applies it)"
            )
        if self.family == "qwen2_moe" and self.kv_channels * self.num_attention_heads != self.hidden_size:
            notes.append(
                f"kv_channels={self.kv_channels} x num_attention_heads={self.num_attention_heads} != hidden_size="
                f"{self.hidden_size}: transformers 4.x's Qwen2MoeForCausalLM sizes heads as hidden_size / "
                f"num_attention_heads and refuses the export (transformers >= 5 reads head_dim)"
            )
        return notes

    def hf_rope_fields(self) -> dict[str, Any]:
        """The rotary settings of config.json in both forms transformers reads: `rope_parameters`
        (5.x) and `rope_theta` + `rope_scaling` (4.x; Nemotron's `partial_rotary_factor` beside
        them), which 4.x needs or it falls back to theta 10000. transformers 5 prefers a non-null
        `rope_scaling` to `rope_parameters` and fills its theta from `rope_theta`, so both forms
        carry the same llama3 scaling (the constants megatron hard-codes)."""
        scaling = None
        if self.rope_scaling_factor is not None:
            scaling = {"rope_type": "llama3", "factor": self.rope_scaling_factor, **_MEGATRON_LLAMA3_ROPE}
        parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta}
        fields: dict[str, Any] = {"rope_parameters": parameters, "rope_theta": self.rope_theta, "rope_scaling": scaling}
        if self.family == "nemotron":  # transformers' Nemotron reads it unconditionally
            parameters["partial_rotary_factor"] = fields["partial_rotary_factor"] = self.rotary_percent
        return fields

    def to_hf_config(self):
        """A transformers config object of the `hf_family`'s class for this architecture."""
        import transformers

        family = self.hf_family
        config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                      "nemotron": transformers.NemotronConfig, "qwen2": transformers.Qwen2Config,
                      "qwen3": transformers.Qwen3Config, "mixtral": transformers.MixtralConfig,
                      "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[family]
        kwargs: dict[str, Any] = dict(
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            hidden_act=FAMILY_LAYERS[self.family][2],
            torch_dtype="float32",
        )
        kwargs["norm_eps" if self.family == "nemotron" else "rms_norm_eps"] = self.norm_eps
        if family not in ("llama", "nemotron"):  # megatron attends to the whole sequence; these configs
            kwargs["sliding_window"] = None     # default to a 4096 window (Qwen's switched off by default)
        if self.is_moe:
            kwargs.update(self._hf_moe_kwargs())
        config = config_cls(**kwargs)
        _set_hf_rope(config, self.hf_rope_fields())
        config.architectures = [HF_ARCHITECTURES[family]]
        return config

    def _hf_moe_kwargs(self) -> dict[str, Any]:
        """The MoE settings of the family's HF config (inverse of `_hf_moe_fields`)."""
        kwargs: dict[str, Any] = {"num_experts_per_tok": self.moe_router_topk}
        if self.family == "mixtral":
            kwargs["num_local_experts"] = self.num_moe_experts
            return kwargs
        kwargs.update(num_experts=self.num_moe_experts, moe_intermediate_size=self.moe_ffn_hidden_size,
                      norm_topk_prob=not self.moe_router_pre_softmax, decoder_sparse_step=1, mlp_only_layers=[])
        if self.family == "qwen2_moe":
            kwargs["shared_expert_intermediate_size"] = self.moe_shared_expert_intermediate_size
        return kwargs

    # --- megatron config -------------------------------------------------------------------------

    def transformer_config(self, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32, ep: int = 1,
                           sequence_parallel: bool = False):
        """The megatron `TransformerConfig` for this architecture at a parallel layout. With
        `sequence_parallel` (tp > 1) the activations outside attention and MLP are split along the
        sequence over the TP ranks, as training an MoE at tp > 1 needs."""
        from megatron.core.transformer import TransformerConfig

        self.check_parallel(tp, pp, ep)
        on_gpu = torch.cuda.is_available()
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            layernorm_epsilon=self.norm_eps,
            normalization=self.normalization,
            gated_linear_unit=self.gated,
            activation_func=torch.nn.functional.silu if self.gated else megatron_squared_relu(),
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            qk_layernorm=self.qk_norm,
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
            **self._megatron_moe_fields(),
        )

    def _megatron_moe_fields(self) -> dict[str, Any]:
        """The MoE fields of the `TransformerConfig` (none for a dense model). Routing in fp32 as HF
        computes it; no load-balancing loss (HF adds none unless `output_router_logits`); the
        all-gather token dispatcher, which every backend runs (gloo included); experts as one MLP
        each (`gpt.layer_spec`)."""
        from megatron.core.transformer import TransformerConfig

        if not self.is_moe:
            return {}
        shared = {}
        if self.moe_shared_expert_intermediate_size is not None:
            # megatron-core 0.16 made the shared expert's gate a config field; before, its MoE spec
            # builds every shared expert without one
            if "moe_shared_expert_gate" not in TransformerConfig.__dataclass_fields__:
                raise UserError(f"{self.family}'s gated shared expert needs megatron-core >= 0.16 (this one builds "
                                f"shared experts without their gate)")
            shared = dict(moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
                          moe_shared_expert_gate=True)
        return dict(
            num_moe_experts=self.num_moe_experts,
            moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            **shared,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
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


def _sliding_window(cfg: dict[str, Any]) -> int | None:
    """The attention window some layer of an HF config really applies (None: every layer attends
    to the whole sequence). Mistral windows every layer when `sliding_window` is set; Qwen2/Qwen3
    only with `use_sliding_window` true (false in the published models, whose `sliding_window` is
    then unused), and only in the layers from `max_window_layers` on (transformers' `layer_types`)."""
    window = cfg.get("sliding_window")
    if not window or not cfg.get("use_sliding_window", True):
        return None
    if cfg.get("model_type") not in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
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
    for key, expected in _MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, expected)) != expected:
            raise UserError(
                f"rope_scaling.{key}={scaling[key]} is not supported: megatron-core fixes it to {expected}"
            )
    return float(scaling["factor"])


def _set_hf_rope(config: Any, fields: dict[str, Any]) -> None:
    """Set `ModelArch.hf_rope_fields` on a config object in the form its transformers reads."""
    if hasattr(config, "rope_parameters"):  # transformers >= 5
        config.rope_parameters = fields["rope_parameters"]
    else:
        for key, value in fields.items():
            if key != "rope_parameters":
                setattr(config, key, value)


def _json_matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field annotation (int, float, bool, str, or `X | None`)."""
    if isinstance(hint, types.UnionType):
        return any(_json_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return " | ".join(getattr(h, "__name__", str(h)) for h in typing.get_args(hint)) if isinstance(
        hint, types.UnionType) else hint.__name__
