"""The model families nemo-minitron prunes, one record each: what a family's layers compute and how
Hugging Face, megatron-core and NeMo 2 name it. Everything that depends on the family (the HF class
export-hf writes, the family an import recognises from a config, the NeMo 2 classes, the sliding-
window rule) reads this table; a leaf module (no transformers, megatron or torch imports).

What the families compute:
- Llama and Mistral: RMSNorm + SwiGLU MLP + rotary over the whole head (they compute alike; the
  family name only picks the HF class).
- Nemotron-4: LayerNorm with bias ("1p" zero-centred gamma in HF files) + squared-ReLU MLP + rotary
  on half of each head.
- Qwen2 / Qwen3: Llama layers plus attention extras. Qwen2 adds a bias to the q, k and v projections
  (not to o_proj); Qwen3 applies an RMSNorm over head_dim to every query and key head before rotary
  (`q_norm` / `k_norm`, one [d] weight each).
- Mixture of experts (every layer's MLP an MoE layer: HF `decoder_sparse_step` 1, no
  `mlp_only_layers`): `num_moe_experts` routed SwiGLU experts of `moe_ffn_hidden_size`, of which a
  [experts, hidden] router picks `moe_router_topk` per token. Mixtral and Qwen3-MoE weight the picked
  experts by the softmax over the picked logits (HF `norm_topk_prob`); Qwen2-MoE by the softmax over
  all experts (`moe_router_pre_softmax`) and adds sigmoid(x . g) times a shared SwiGLU expert of
  `moe_shared_expert_intermediate_size`.
- Nemotron-H (hybrid): a stack of single-purpose layers in a pattern (megatron's
  `hybrid_override_pattern`: M a Mamba-2 mixer, * attention, - an MLP), each RMSNorm + its mixer
  + residual; squared-ReLU MLPs; attention without positional embeddings (the Mamba layers carry
  position). The Mamba-2 mixer (`models/mamba_kernels.py` states its math): in_proj to
  [z; x; B; C; dt], a depthwise causal conv1d over [x; B; C], the selective scan per head (A_log,
  D, dt_bias one per head; B and C one per SSM group of heads), an RMSNorm per group gated by
  silu(z), out_proj.

Adding a family is one `Family` row here plus, if its HF files name weights differently, their
names in `bridge.py` (docs/design.md walks through it).
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTED, ROUTED_SHARED = "routed", "routed+shared"  # `Family.experts`: MoE layers without / with a shared expert


@dataclass(frozen=True)
class Family:
    name: str                  # the `ModelArch.family` and HF `model_type`
    hf_class: str              # transformers model class (config.json `architectures`)
    hf_config: str             # transformers config class
    normalization: str         # megatron-core's name: RMSNorm | LayerNorm
    activation: str            # swiglu | squared_relu
    hf_act: str                # the HF config's name of that activation (under `hf_act_key`)
    qkv_bias: bool = False     # biases on the q, k and v projections
    qk_norm: bool = False      # RMSNorm over head_dim on every query and key head
    experts: str | None = None  # None: dense MLPs; ROUTED or ROUTED_SHARED: MoE layers
    hf_norm_eps: str = "rms_norm_eps"    # the HF config key of the norms' epsilon
    hf_act_key: str = "hidden_act"       # the HF config key of the MLP activation (NemotronH: mlp_hidden_act)
    hf_window_default: bool = True       # the HF config class defaults to a sliding window (export sets it off)
    hf_window_switch: bool = False       # HF `sliding_window` applies only with `use_sliding_window` and in the
    #                                      layers from `max_window_layers` on (Qwen); else in every layer
    hf_rotary_percent: float = 1.0       # the HF config's default share of each head that rotary turns
    nemo_classes: tuple[str, str] | None = None  # NeMo 2's (model class, config class) in nemo.collections.llm
    hybrid: bool = False                 # Mamba, attention and MLP layers in a pattern (megatron's MambaModel),
    #                                      attention without rotary
    hf_ties: bool = True                 # the HF class ties lm_head to the embedding when `tie_word_embeddings`
    #                                      says so (transformers' NemotronH never does: its files carry lm_head)
    hf_file_prefix: str = "model."       # the base model's prefix in the weight files (the class's own in memory
    #                                      is "model."; NemotronH files, as published, say "backbone.")

    @property
    def attention(self) -> dict[str, bool]:
        """The `ModelArch` attention-extra fields: {"qkv_bias": .., "qk_norm": ..}."""
        return {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm}

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    def computes_like(self, other: "Family") -> bool:
        """Whether the two families' layers compute the same (Llama and Mistral do; Qwen3 and Qwen3-MoE do not)."""
        return self.layers == other.layers

    @property
    def layers(self) -> tuple:
        """What decides the computation: norm, activation, attention extras, experts, hybrid."""
        return self.normalization, self.activation, self.qkv_bias, self.qk_norm, self.experts, self.hybrid


_SWIGLU = {"normalization": "RMSNorm", "activation": "swiglu", "hf_act": "silu"}
_QWEN = {**_SWIGLU, "hf_window_switch": True}

# In order of preference: the first family whose layers match is the one a config without a name
# (a Megatron-LM run, a bare GPTModel) is taken for, so Llama comes before Mistral.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", "LlamaForCausalLM", "LlamaConfig", **_SWIGLU, hf_window_default=False,
           nemo_classes=("LlamaModel", "LlamaConfig")),
    Family("mistral", "MistralForCausalLM", "MistralConfig", **_SWIGLU, nemo_classes=("MistralModel", "MistralConfig7B")),
    Family("nemotron", "NemotronForCausalLM", "NemotronConfig", "LayerNorm", "squared_relu", "relu2",
           hf_norm_eps="norm_eps", hf_window_default=False, hf_rotary_percent=0.5,
           nemo_classes=("NemotronModel", "NemotronConfig")),
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", **_QWEN, qkv_bias=True, nemo_classes=("Qwen2Model", "Qwen2Config")),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", **_QWEN, qk_norm=True, nemo_classes=("Qwen3Model", "Qwen3Config")),
    Family("mixtral", "MixtralForCausalLM", "MixtralConfig", **_SWIGLU, experts=ROUTED,
           nemo_classes=("MixtralModel", "MixtralConfig")),
    # NeMo 2 has no Qwen2-MoE model
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_QWEN, qkv_bias=True, experts=ROUTED_SHARED),
    # NeMo's Qwen3Model with the MoE config, which llm does not re-export
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_QWEN, qk_norm=True, experts=ROUTED,
           nemo_classes=("Qwen3Model", "gpt.model.qwen3.Qwen3MoEConfig")),
    # NeMo's MambaModel with the base of its NemotronH configs, which llm does not re-export
    Family("nemotron_h", "NemotronHForCausalLM", "NemotronHConfig", "RMSNorm", "squared_relu", "relu2",
           hf_norm_eps="layer_norm_epsilon", hf_act_key="mlp_hidden_act", hf_window_default=False, hybrid=True,
           hf_ties=False,
           hf_file_prefix="backbone.", nemo_classes=("MambaModel", "gpt.model.ssm.NemotronHConfigBase")),
)}


def family_of(normalization: str | None, activation: str | None, qkv_bias: bool = False, qk_norm: bool = False,
              moe: bool = False, shared_expert: bool = False, hybrid: bool = False) -> str | None:
    """The first family (so Llama before Mistral) whose layers are `normalization` + `activation`, as a
    framework config names them ("RMSNorm", "swiglu"), with these attention extras and MoE layers
    (with or without a shared expert), in a hybrid Mamba stack or not; None when no family has them."""
    experts = (ROUTED_SHARED if shared_expert else ROUTED) if moe else None
    wanted = (normalization, activation, qkv_bias, qk_norm, experts, hybrid)
    return next((f.name for f in FAMILIES.values() if f.layers == wanted), None)


def has_layers(normalization: str | None, activation: str | None) -> bool:
    """Whether some family's layers are `normalization` + `activation` (with whatever extras)."""
    return any((f.normalization, f.activation) == (normalization, activation) for f in FAMILIES.values())


def no_family_problem(normalization: str, activation: str, named: str, spellings: tuple[str, str, str]) -> str:
    """The problem phrase for `normalization` + `activation` layers with the extras `named` (as the
    source lists them) that `family_of` matches to no family; `spellings` are the source's names for
    QKV biases, query/key norms and experts."""
    qkv_bias, qk_norm, experts = spellings
    return (f"{normalization} + {activation} layers with {named}, which no Hugging Face family has (RMSNorm + swiglu "
            f"take {qkv_bias} (Qwen2) or {qk_norm} (Qwen3); with {experts}, {qk_norm} (Qwen3-MoE), {qkv_bias} with a "
            f"gated shared expert (Qwen2-MoE) or neither (Mixtral))")


def computes_alike(family: str, other: str) -> bool:
    """Whether two families' layers compute the same (by name; see `Family.computes_like`)."""
    return FAMILIES[family].computes_like(FAMILIES[other])


def family_attention(family: str) -> dict[str, bool]:
    """The `ModelArch` attention-extra fields of `family`: {"qkv_bias": .., "qk_norm": ..}."""
    return FAMILIES[family].attention
