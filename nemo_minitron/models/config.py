"""The architecture of a decoder of one of the families (`families.FAMILIES`), as one small typed
config.

`ModelArch` is what a checkpoint records (`model_config.json`), what pruning edits and what the
planner counts. It knows no framework: `hf_config` translates it to and from a Hugging Face config,
`gpt.transformer_config` builds megatron's `TransformerConfig` from it and `gpt.arch_of` reads it
back from a model.
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


from nemo_minitron.errors import UserError, read_json
from nemo_minitron.models.families import FAMILIES, ROUTED_SHARED, family_attention

# The keys that give a decoder its shape: what pruning changes, reports and plans compare.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
# The shape keys of mixture-of-experts layers (megatron-core's names; None in a dense model, and the
# shared expert's None in a family without one).
MOE_SHAPE_KEYS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
# The shape keys of a hybrid model's Mamba-2 mixers (Model Optimizer's and megatron-core's names;
# None outside the hybrid family): heads and channels per head are pruned, groups and state kept.
MAMBA_SHAPE_KEYS = ("mamba_num_heads", "mamba_head_dim")
MAMBA_KEYS = (*MAMBA_SHAPE_KEYS, "mamba_num_groups", "mamba_state_dim")
# A hybrid model's layer symbols (megatron's `hybrid_override_pattern`) and the layer each makes.
LAYER_SYMBOLS = {"M": "mamba", "*": "attention", "-": "mlp"}
# What a layer of each kind (`ModelArch.layer_types`) holds: a transformer layer attention and an
# MLP, a hybrid's layer its one mixer.
LAYER_PARTS = {"transformer": ("attention", "mlp"), "attention": ("attention",), "mlp": ("mlp",), "mamba": ("mamba",)}
# The width of every Mamba mixer's causal convolution (megatron-core's MambaLayer builds it so).
MAMBA_CONV_KERNEL = 4
# The epsilon of megatron-core's gated norm inside every Mamba mixer (fixed there, not configurable).
MAMBA_NORM_EPS = 1e-5
# What a checkpoint records beside the computation: the family name (Llama and Mistral compute
# alike) and the special token ids that HF configs carry.
IDENTITY_KEYS = ("family", "bos_token_id", "eos_token_id")

def _same_setting(mine: Any, other: Any) -> bool:
    if isinstance(mine, float) or isinstance(other, float):
        return isinstance(mine, (int, float)) and isinstance(other, (int, float)) and math.isclose(mine, other, rel_tol=1e-6)
    return mine == other


@dataclass
class ModelArch:
    """A decoder with rotary GQA attention: RMSNorm + SwiGLU (Llama, Mistral; Qwen2 with QKV
    biases, Qwen3 with per-head query/key norms) or LayerNorm + squared ReLU with partial rotary
    (Nemotron-4); optionally tied embeddings. Or a hybrid (Nemotron-H): `hybrid_pattern` lays out
    Mamba-2, attention (GQA without rotary) and squared-ReLU MLP layers, one symbol each."""

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
    hybrid_pattern: str | None = None   # one symbol per layer: M Mamba-2, * attention, - MLP (hybrid family only)
    mamba_num_heads: int | None = None  # SSM heads of every Mamba layer
    mamba_head_dim: int | None = None   # channels per SSM head
    mamba_num_groups: int | None = None  # SSM groups (B and C are per group; heads split evenly over groups)
    mamba_state_dim: int | None = None  # SSM state size per group

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
        if self.family not in FAMILIES:
            raise UserError(f"model.family={self.family!r} is not one of {sorted(FAMILIES)}")
        if self.rotary_percent != 1.0 and FAMILIES[self.family].hf_rotary_percent == 1.0:
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
        self._validate_hybrid()

    def _validate_hybrid(self) -> None:
        """A hybrid family's pattern and Mamba fields: all set and consistent; none in another family."""
        keys = ("hybrid_pattern", *MAMBA_KEYS)
        if not FAMILIES[self.family].hybrid:
            set_keys = [key for key in keys if getattr(self, key) is not None]
            if set_keys:
                raise UserError(f"model.{set_keys[0]} is set but model.family={self.family!r} has no Mamba layers "
                                f"(hybrid families: {sorted(n for n, f in FAMILIES.items() if f.hybrid)})")
            return
        self._require_positive(MAMBA_KEYS)
        pattern = self.hybrid_pattern or ""
        if len(pattern) != self.num_layers or set(pattern) - set(LAYER_SYMBOLS):
            raise UserError(f"model.hybrid_pattern={self.hybrid_pattern!r} must have one symbol per layer "
                            f"(num_layers={self.num_layers}), each one of {LAYER_SYMBOLS}")
        if self.mamba_num_heads % self.mamba_num_groups:
            raise UserError(f"model.mamba_num_heads={self.mamba_num_heads} is not a multiple of "
                            f"model.mamba_num_groups={self.mamba_num_groups}: every SSM group holds as many heads")
        if self.rope_scaling_factor is not None or self.rotary_percent != 1.0:
            raise UserError(f"model.rope_scaling_factor / rotary_percent are set but {self.family}'s attention "
                            f"has no rotary embedding")
        if not math.isclose(self.norm_eps, MAMBA_NORM_EPS, rel_tol=1e-6):
            raise UserError(f"model.norm_eps={self.norm_eps}: megatron-core's Mamba mixer normalises with a fixed "
                            f"epsilon of {MAMBA_NORM_EPS}, so a {self.family} model's norms must use it too")

    @property
    def is_hybrid(self) -> bool:
        """Mamba, attention and MLP layers in a pattern (megatron's MambaModel)."""
        return self.hybrid_pattern is not None

    @property
    def layer_types(self) -> list[str]:
        """Every layer's kind in order: "mamba", "attention" or "mlp" in a hybrid; "transformer"
        (attention + MLP) elsewhere."""
        if not self.is_hybrid:
            return ["transformer"] * self.num_layers
        return [LAYER_SYMBOLS[symbol] for symbol in self.hybrid_pattern]

    def layers_with(self, part: str) -> list[int]:
        """The layers that hold `part`: "attention", "mlp" or "mamba" (`LAYER_PARTS`)."""
        return [i for i, kind in enumerate(self.layer_types) if part in LAYER_PARTS[kind]]

    @property
    def mamba_inner(self) -> int:
        """A Mamba layer's inner width d_in = heads x head channels (x and z each have d_in rows)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_in_proj_blocks(self) -> dict[str, int]:
        """The row blocks of a Mamba layer's in_proj, in order: z, x, B, C, dt."""
        bc = self.mamba_num_groups * self.mamba_state_dim
        return {"z": self.mamba_inner, "x": self.mamba_inner, "B": bc, "C": bc, "dt": self.mamba_num_heads}

    @property
    def mamba_conv_blocks(self) -> dict[str, int]:
        """The channel blocks of a Mamba layer's conv1d, in order: x, B, C."""
        blocks = self.mamba_in_proj_blocks
        return {key: blocks[key] for key in ("x", "B", "C")}

    def _require_positive(self, keys) -> None:
        """UserError naming the first of the family's required `keys` that is unset or below 1."""
        for key in keys:
            if getattr(self, key) is None or getattr(self, key) < 1:
                raise UserError(f"model.{key} must be a positive integer in a {self.family} model, got "
                                f"{getattr(self, key)}")

    def _validate_moe(self) -> None:
        """The MoE fields: all set (the shared expert only for Qwen2-MoE) in an MoE family, none in
        a dense one; 1 <= top-k <= experts."""
        if not FAMILIES[self.family].is_moe:
            set_keys = [key for key in (*MOE_SHAPE_KEYS, "moe_router_topk") if getattr(self, key) is not None]
            if set_keys or self.moe_router_pre_softmax:
                raise UserError(f"model.{(set_keys or ['moe_router_pre_softmax'])[0]} is set but model.family="
                                f"{self.family!r} is dense: mixture-of-experts layers are the "
                                f"{sorted(name for name, f in FAMILIES.items() if f.is_moe)} families'")
            return
        shared = FAMILIES[self.family].experts == ROUTED_SHARED
        required = ["num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size"]
        required += ["moe_shared_expert_intermediate_size"] if shared else []
        self._require_positive(required)
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
        return FAMILIES[self.family].normalization

    @property
    def activation(self) -> str:
        """swiglu (linear_fc1 = [gate; up]) or squared_relu (linear_fc1 = up), fixed by the family."""
        return FAMILIES[self.family].activation

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
        for key in ("mamba_num_heads", "mamba_num_groups") if self.is_hybrid else ():
            if getattr(self, key) % tp:  # whole SSM heads and groups per rank
                raise UserError(f"tp={tp} does not divide {key}={getattr(self, key)}: change tp=")
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
        if self.is_hybrid:  # one norm and one mixer per layer
            per_type = {"mamba": self._mamba_parameters(), "attention": attention, "mlp": mlp}
            non_embedding = sum(per_type[kind] + norm for kind in self.layer_types) + norm
            return {"total": non_embedding + embedding, "non_embedding": non_embedding}
        non_embedding = self.num_layers * (attention + mlp + 2 * norm) + norm
        counts = {"total": non_embedding + embedding, "non_embedding": non_embedding}
        if self.is_moe:
            counts["active"] = counts["total"] - self.num_layers * (mlp - active_mlp)
        return counts

    def _mamba_parameters(self) -> int:
        """One Mamba-2 mixer: in_proj [z; x; B; C; dt] x h, conv1d (kernel 4, with bias) over
        [x; B; C], A_log, D and dt_bias per head, the gated norm over d_in, out_proj h x d_in."""
        h, conv = self.hidden_size, sum(self.mamba_conv_blocks.values())
        return (sum(self.mamba_in_proj_blocks.values()) * h + conv * (MAMBA_CONV_KERNEL + 1)
                + 3 * self.mamba_num_heads + self.mamba_inner + self.mamba_inner * h)

    def differences(self, other: "ModelArch") -> list[str]:
        """`key=mine vs other` for every field that changes what the two models compute. Floats
        (norm epsilon, rotary base and scaling) are the same within a relative 1e-6: a value that
        went through float32 somewhere (a GGUF file, a config built in bf16 code) is the same setting."""
        return [f"{f.name}={getattr(self, f.name)} vs {getattr(other, f.name)}" for f in dataclasses.fields(self)
                if f.name not in IDENTITY_KEYS and not _same_setting(getattr(self, f.name), getattr(other, f.name))]

    def shape(self) -> dict[str, int]:
        """The shape keys, and the MoE or Mamba ones a mixture-of-experts or hybrid model has."""
        extra = {key: getattr(self, key) for key in (*MOE_SHAPE_KEYS, *MAMBA_SHAPE_KEYS) if getattr(self, key) is not None}
        return {key: getattr(self, key) for key in SHAPE_KEYS} | extra

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
