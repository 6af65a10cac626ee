"""The Hugging Face <-> Megatron weight bridge. The only code that knows HF parameter names.

Weights travel in two layouts:
- *global*: megatron names with global layer indices and TP=1 shapes (what a TP=1 x PP=1 model
  holds; fc1 is [gate; up] for SwiGLU, up alone for squared ReLU; qkv is group-major; LayerNorm
  models add a `.bias` beside every norm `.weight`; Qwen2 adds `linear_qkv.bias`, group-major like
  the weight's rows; Qwen3 adds `q_layernorm.weight` / `k_layernorm.weight` of head_dim; an MoE
  layer's MLP is `mlp.router.weight` [experts, h] and, per routed expert e (global index),
  `mlp.experts.local_experts.<e>.linear_fc1/linear_fc2.weight` laid out like a dense SwiGLU MLP,
  plus Qwen2-MoE's `mlp.shared_experts.linear_fc1/linear_fc2.weight` and `.gate_weight` [1, h]);
  A hybrid (Nemotron-H) layer holds one of: a Mamba mixer (`norm.weight`, then under `mixer.`:
  `in_proj.weight` with rows [z; x; B; C; dt], `conv1d.weight` [channels, 1, 4] and `.bias` over
  [x; B; C], `dt_bias`, `A_log`, `D` per head, the gated `norm.weight` [d_in], `out_proj.weight`),
  attention (`input_layernorm`, `self_attention.linear_qkv/linear_proj`) or an MLP
  (`pre_mlp_layernorm`, `mlp.linear_fc1` = up, `linear_fc2`); its final norm is `decoder.final_norm`;
- *local*: what one rank of a TP x PP model holds. A tensor made of row blocks (SwiGLU's fc1
  [gate; up], a Mamba in_proj or conv1d) splits block by block: each rank holds its slice of
  every block, in the same order.
`hf_to_global`/`global_to_hf` convert names and fuse/unfuse QKV and gate/up; `load_global`
and `gather_global` move between the global layout and the local shards of a live model.

Nemotron's HF files store LayerNorm1P gammas zero-centred (the model computes weight + 1). Megatron's
local (torch) norm has no zero-centred mode, so the global layout holds the gamma the model applies:
+1 on import, -1 on export. The two are the same model; training is unaffected because norms get
no weight decay.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import MAMBA_CONV_KERNEL, ModelArch
from nemo_minitron.models.families import FAMILIES
from nemo_minitron.models.gpt import arch_of, unwrap_model

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# A routed expert's weights: SequentialMLP's `local_experts.<j>.linear_fc1.weight` (local spec) or
# TEGroupedMLP's `linear_fc1.weight<j>` (TE spec), j = this rank's local expert index.
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12]\.weight)|(linear_fc[12]\.weight)(\d+))$")

# Fused-norm names of the TE layer spec, mapped to the local spec's separate norm modules.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# The Mamba layer's fused norm (TE spec: in in_proj), exact names relative to the layer.
_TE_TO_LOCAL_MAMBA = {"mixer.in_proj.layer_norm_weight": "norm.weight"}
# A Mamba mixer's tensors: the same names under `mixer.` in megatron's layer and HF's NemotronH block.
MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                "out_proj.weight")
# A hybrid layer's norm module (local spec) by layer kind; HF calls each `norm`.
_HYBRID_NORM = {"mamba": "norm.", "attention": "input_layernorm.", "mlp": "pre_mlp_layernorm."}
# What HF files store for a norm weight, subtracted from the gamma the model applies.
_HF_NORM_WEIGHT_OFFSET = {"nemotron": 1.0}


# --- HF <-> global ---------------------------------------------------------------------------------

def qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """HF q/k/v projections -> megatron's group-major linear_qkv: per group, its q heads, k, v.
    Rows are output channels, so the same function fuses the weights ([rows, h]) and the biases
    ([rows]) of the three projections."""
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    rest = q.shape[1:]
    q = q.view(groups, per_group * d, *rest)
    k = k.view(groups, d, *rest)
    v = v.view(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_split(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `qkv_fuse` (a weight or a bias)."""
    groups, d = arch.num_query_groups, arch.kv_channels
    per_group = arch.num_attention_heads // groups
    rest = qkv.shape[1:]
    q, k, v = qkv.view(groups, (per_group + 2) * d, *rest).split([per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def qkv_params(arch: ModelArch) -> tuple[str, ...]:
    """The parameters of linear_qkv (and of HF's q/k/v_proj): the weight, and Qwen2's bias."""
    return ("weight", "bias") if arch.qkv_bias else ("weight",)


def _embedding_name(arch: ModelArch) -> str:
    """HF's name of the input embedding."""
    return "model.embeddings.weight" if arch.is_hybrid else "model.embed_tokens.weight"


def _attention_hf(arch: ModelArch, layer: int) -> str:
    """HF's module prefix of a layer's attention (NemotronH calls every layer's mixer `mixer`)."""
    return f"model.layers.{layer}." + ("mixer." if arch.is_hybrid else "self_attn.")


def final_norm(arch: ModelArch) -> str:
    """The module prefix of the final norm: megatron's Mamba stack calls it `final_norm`."""
    return "decoder.final_norm." if arch.is_hybrid else "decoder.final_layernorm."


def layer_norms(arch: ModelArch, layer: int) -> list[str]:
    """The norm modules of a layer (local-spec names): a transformer layer's two, a hybrid layer's one."""
    kind = arch.layer_types[layer]
    return ["input_layernorm.", "pre_mlp_layernorm."] if kind == "transformer" else [_HYBRID_NORM[kind]]


def _norm_pairs(arch: ModelArch) -> list[tuple[str, str]]:
    """(megatron, HF) names of every norm tensor (weights, and biases for LayerNorm)."""
    pairs = [(final_norm(arch), "model.norm_f." if arch.is_hybrid else "model.norm.")]
    for i, kind in enumerate(arch.layer_types):
        hf_norms = ["input_layernorm.", "post_attention_layernorm."] if kind == "transformer" else ["norm."]
        pairs += [(f"decoder.layers.{i}.{mg}", f"model.layers.{i}.{hf}") for mg, hf in zip(layer_norms(arch, i), hf_norms)]
    return [(m + p, h + p) for m, h in pairs for p in arch.norm_params]


def _linear_pairs(arch: ModelArch) -> list[tuple[str, str]]:
    """(megatron, HF) names of the linear weights that map one-to-one: the attention output, every
    MLP's down projection (and a non-gated MLP's up projection), an MoE layer's router and shared
    expert gate."""
    pairs = [(f"decoder.layers.{i}.self_attention.linear_proj.weight", _attention_hf(arch, i) + "o_proj.weight")
             for i in arch.layers_with("attention")]
    pairs += [(f"decoder.layers.{i}.mixer.{p}", f"model.layers.{i}.mixer.{p}")
              for i, kind in enumerate(arch.layer_types) if kind == "mamba" for p in MAMBA_PARAMS]
    for i in range(arch.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mg, hf, (_, up, down) in _mlps(arch, i):
            pairs.append((mg + "linear_fc2.weight", f"{hf}{down}.weight"))
            if not arch.gated:
                pairs.append((mg + "linear_fc1.weight", f"{hf}{up}.weight"))
        if arch.is_moe:
            hf_moe = h + ("block_sparse_moe." if arch.family == "mixtral" else "mlp.")
            pairs.append((m + "mlp.router.weight", hf_moe + "gate.weight"))
            if arch.moe_shared_expert_intermediate_size:
                pairs.append((m + "mlp.shared_experts.gate_weight", h + "mlp.shared_expert_gate.weight"))
    return pairs


def _mlps(arch: ModelArch, layer: int) -> list[tuple[str, str, tuple[str, str, str]]]:
    """(megatron module prefix, HF module prefix, HF (gate, up, down) names) of every MLP of a
    layer: its dense MLP, or each routed expert then the shared expert of an MoE layer. Each holds
    `linear_fc1` = [gate; up] and `linear_fc2` = down on the megatron side."""
    m, h = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}."
    if arch.is_hybrid:  # only "-" layers have an MLP, and it has no gate
        return [(m, h + "mixer.", ("", "up_proj", "down_proj"))] if arch.layer_types[layer] == "mlp" else []
    if not arch.is_moe:
        return [(m, h + "mlp.", ("gate_proj", "up_proj", "down_proj"))]
    if arch.family == "mixtral":
        return [(f"{m}experts.local_experts.{e}.", f"{h}block_sparse_moe.experts.{e}.", ("w1", "w3", "w2"))
                for e in range(arch.num_moe_experts)]
    mlps = [(f"{m}experts.local_experts.{e}.", f"{h}mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"))
            for e in range(arch.num_moe_experts)]
    if arch.moe_shared_expert_intermediate_size:
        mlps.append((m + "shared_experts.", h + "mlp.shared_expert.", ("gate_proj", "up_proj", "down_proj")))
    return mlps


def qk_norm_pairs(arch: ModelArch) -> list[tuple[str, str]]:
    """(megatron, HF) names of Qwen3's per-head query/key norm weights ([head_dim] each, shared by
    all heads of a layer, replicated across TP; no offset: RMSNorm gammas as applied)."""
    if not arch.qk_norm:
        return []
    return [(f"decoder.layers.{i}.self_attention.{mg}_layernorm.weight", f"model.layers.{i}.self_attn.{mg}_norm.weight")
            for i in range(arch.num_layers) for mg in ("q", "k")]


def _shift(tensor: torch.Tensor, offset: float) -> torch.Tensor:
    """tensor + offset computed in fp32 (what transformers computes), in the tensor's dtype."""
    return tensor if offset == 0 else (tensor.float() + offset).to(tensor.dtype)


def _hub_expert_layout(arch: ModelArch, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`hf` with the routed experts one module each, as checkpoint files store them. transformers 5
    holds a layer's experts fused in memory (`mlp.experts.gate_up_proj` [E, 2F, h] with each
    expert's rows [gate; up], `mlp.experts.down_proj` [E, h, F], Mixtral's router as `mlp.gate`);
    its files, and every transformers 4.x, use one module per expert."""
    if not arch.is_moe or not any(name.endswith("mlp.experts.gate_up_proj") for name in hf):
        return hf
    hub = dict(hf)
    for i in range(arch.num_layers):
        fused = f"model.layers.{i}.mlp."
        if fused + "experts.gate_up_proj" not in hub:
            continue
        gate_up, down = hub.pop(fused + "experts.gate_up_proj"), hub.pop(fused + "experts.down_proj")
        experts = [mlp for mlp in _mlps(arch, i) if ".experts." in mlp[0]]
        for (_, hf_mlp, (gate, up, down_name)), rows, columns in zip(experts, gate_up, down):
            hub[f"{hf_mlp}{gate}.weight"], hub[f"{hf_mlp}{up}.weight"] = rows.chunk(2)
            hub[f"{hf_mlp}{down_name}.weight"] = columns
        if arch.family == "mixtral":
            hub[f"model.layers.{i}.block_sparse_moe.gate.weight"] = hub.pop(fused + "gate.weight")
    return hub


def _memory_names(arch: ModelArch, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`hf` under the names the family's transformers class holds in memory: NemotronH's files
    name its base model `backbone.`, the class `model.` (transformers renames on load and save)."""
    prefix = FAMILIES[arch.family].hf_file_prefix
    if prefix == "model.":
        return hf
    return {("model." + name[len(prefix):]) if name.startswith(prefix) else name: t for name, t in hf.items()}


def hf_to_global(arch: ModelArch, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict (either expert layout, see `_hub_expert_layout`; file or in-memory names, see
    `_memory_names`) -> global megatron state dict (local-spec names)."""
    hf = _hub_expert_layout(arch, _memory_names(arch, hf))
    offset = _HF_NORM_WEIGHT_OFFSET.get(arch.family, 0.0)
    out = {"embedding.word_embeddings.weight": _require(hf, _embedding_name(arch), arch)}
    for mg, hf_name in _norm_pairs(arch):
        out[mg] = _shift(_require(hf, hf_name, arch), offset if mg.endswith("weight") else 0.0)
    for mg, hf_name in _linear_pairs(arch) + qk_norm_pairs(arch):
        out[mg] = _require(hf, hf_name, arch)
    for i in arch.layers_with("attention"):
        for param in qkv_params(arch):
            out[f"decoder.layers.{i}.self_attention.linear_qkv.{param}"] = qkv_fuse(
                *(_require(hf, f"{_attention_hf(arch, i)}{p}_proj.{param}", arch) for p in "qkv"), arch
            )
    for i in range(arch.num_layers):
        if arch.gated:
            for mg, hf_mlp, (gate, up, _) in _mlps(arch, i):
                out[mg + "linear_fc1.weight"] = torch.cat(
                    [_require(hf, f"{hf_mlp}{gate}.weight", arch), _require(hf, f"{hf_mlp}{up}.weight", arch)])
    if not arch.tie_embeddings:
        out["output_layer.weight"] = _require(hf, "lm_head.weight", arch)
    elif not FAMILIES[arch.family].hf_ties and "lm_head.weight" in hf:
        if not torch.equal(hf["lm_head.weight"], out["embedding.word_embeddings.weight"]):
            raise UserError(f"tie_word_embeddings is true but lm_head.weight differs from the embedding, and "
                            f"transformers' {FAMILIES[arch.family].hf_class} does not tie them (it computes with "
                            f"lm_head): set tie_word_embeddings to false in config.json to import this model")
    _check_shapes(arch, out)
    return out


def global_to_hf(arch: ModelArch, mg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Global megatron state dict -> HF state dict."""
    offset = _HF_NORM_WEIGHT_OFFSET.get(arch.family, 0.0)
    out = {_embedding_name(arch): mg["embedding.word_embeddings.weight"]}
    for mg_name, hf_name in _norm_pairs(arch):
        out[hf_name] = _shift(mg[mg_name], -offset if mg_name.endswith("weight") else 0.0)
    for mg_name, hf_name in _linear_pairs(arch) + qk_norm_pairs(arch):
        out[hf_name] = mg[mg_name]
    for i in arch.layers_with("attention"):
        h = _attention_hf(arch, i)
        for param in qkv_params(arch):
            q, k, vv = qkv_split(mg[f"decoder.layers.{i}.self_attention.linear_qkv.{param}"], arch)
            out[f"{h}q_proj.{param}"], out[f"{h}k_proj.{param}"], out[f"{h}v_proj.{param}"] = q, k, vv
    for i in range(arch.num_layers):
        if arch.gated:
            for mg_mlp, hf_mlp, (gate, up, _) in _mlps(arch, i):
                out[f"{hf_mlp}{gate}.weight"], out[f"{hf_mlp}{up}.weight"] = mg[mg_mlp + "linear_fc1.weight"].chunk(2)
    if not arch.tie_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"]
    elif not FAMILIES[arch.family].hf_ties:  # the class would start lm_head from random weights
        out["lm_head.weight"] = mg["embedding.word_embeddings.weight"].clone()
    return {k: t.contiguous() for k, t in out.items()}


def _require(sd: dict[str, torch.Tensor], name: str, arch: ModelArch) -> torch.Tensor:
    if name not in sd:
        hint = " (lm_head missing: is tie_word_embeddings set correctly?)" if name == "lm_head.weight" else ""
        raise UserError(f"checkpoint has no tensor {name!r}{hint}; it does not match the config {arch.family}")
    return sd[name]


def expected_global_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    h, d = arch.hidden_size, arch.kv_channels
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (arch.vocab_size, h)}
    shapes.update({name: (h,) for name, _ in _norm_pairs(arch)})
    shapes.update({name: (d,) for name, _ in qk_norm_pairs(arch)})
    for i in arch.layers_with("attention"):
        p = f"decoder.layers.{i}."
        if arch.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (arch.qkv_rows,)
        shapes.update({
            p + "self_attention.linear_qkv.weight": (arch.qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, arch.num_attention_heads * d),
        })
    for i, kind in enumerate(arch.layer_types):
        p = f"decoder.layers.{i}."
        if kind == "mamba":
            shapes.update({p + "mixer." + name: shape for name, shape in _mamba_shapes(arch).items()})
        for mlp, _, _ in _mlps(arch, i):
            width = _mlp_width(arch, mlp)
            shapes[mlp + "linear_fc1.weight"] = ((2 if arch.gated else 1) * width, h)
            shapes[mlp + "linear_fc2.weight"] = (h, width)
        if arch.is_moe:
            shapes[p + "mlp.router.weight"] = (arch.num_moe_experts, h)
            if arch.moe_shared_expert_intermediate_size:
                shapes[p + "mlp.shared_experts.gate_weight"] = (1, h)
    if not arch.tie_embeddings:
        shapes["output_layer.weight"] = (arch.vocab_size, h)
    return shapes


def _mamba_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The shapes of a Mamba mixer's tensors (names under `mixer.`)."""
    h, inner, heads = arch.hidden_size, arch.mamba_inner, arch.mamba_num_heads
    conv = sum(arch.mamba_conv_blocks.values())
    return {"in_proj.weight": (sum(arch.mamba_in_proj_blocks.values()), h), "conv1d.weight": (conv, 1, MAMBA_CONV_KERNEL),
            "conv1d.bias": (conv,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (inner,),
            "out_proj.weight": (h, inner)}


def _mlp_width(arch: ModelArch, mlp_prefix: str) -> int:
    """The FFN width of the MLP at `mlp_prefix`: a routed expert's, the shared expert's or the dense one's."""
    if ".experts." in mlp_prefix:
        return arch.moe_ffn_hidden_size
    if ".shared_experts." in mlp_prefix:
        return arch.moe_shared_expert_intermediate_size
    return arch.ffn_hidden_size


def checkpoint_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """The global shapes a megatron distributed checkpoint of `arch` holds: per-layer tensors are
    stacked over the layers (a leading `num_layers` dim, key `decoder.layers.<name>`), the routed
    experts' also over the experts (`decoder.layers.mlp.experts.experts.<name>`, [L, E, ...]), and
    the per-layer norms go by their fused-norm names, as megatron writes them for either layer spec.
    megatron's Mamba stack (a hybrid) saves every layer under its own index instead, and a Mamba
    in_proj and conv1d as one tensor per row block (`in_proj.weight.z`, ..., `conv1d.bias.C`), so
    each splits over TP on its own."""
    local_to_te = {local: te for te, local in {**_TE_TO_LOCAL, **_TE_TO_LOCAL_MAMBA}.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in expected_global_shapes(arch).items():
        layer = _LAYER.match(name)
        if layer is None:
            shapes[name] = shape
            continue
        rest = local_to_te.get(layer.group(2), layer.group(2))
        expert = _LOCAL_EXPERT.match(rest)
        if arch.is_hybrid:
            key = f"decoder.layers.{layer.group(1)}.{rest}"
            blocks = {"mixer.in_proj.weight": arch.mamba_in_proj_blocks}.get(rest) or (
                arch.mamba_conv_blocks if rest.startswith("mixer.conv1d.") else {})
            shapes.update({f"{key}.{block}": (rows, *shape[1:]) for block, rows in blocks.items()} or {key: shape})
        elif expert:
            shapes[f"decoder.layers.mlp.experts.experts.{expert.group(2)}"] = (arch.num_layers, arch.num_moe_experts, *shape)
        else:
            shapes[f"decoder.layers.{rest}"] = (arch.num_layers, *shape)
    return shapes


def _check_shapes(arch: ModelArch, sd: dict[str, torch.Tensor]) -> None:
    for name, shape in expected_global_shapes(arch).items():
        if tuple(sd[name].shape) != shape:
            raise UserError(
                f"tensor {name} has shape {tuple(sd[name].shape)} but the config implies {shape}: "
                f"the weights do not match the model config"
            )


# --- global <-> local shards -----------------------------------------------------------------------

def _local_to_global_name(model, local_name: str) -> str:
    """Local parameter name -> global name: global layer index, local-spec norm names, global expert
    index (this rank's experts are `ep_rank * local experts` on)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = model.decoder.layers[int(match.group(1))]
    rest = _TE_TO_LOCAL.get(match.group(2)) or _TE_TO_LOCAL_MAMBA.get(match.group(2), match.group(2))
    expert = _LOCAL_EXPERT.match(rest)
    if expert:
        local_index, param = (int(expert.group(1)), expert.group(2)) if expert.group(1) else (int(expert.group(4)), expert.group(3))
        rest = f"mlp.experts.local_experts.{layer.mlp.local_expert_indices[local_index]}.{param}"
    return f"decoder.layers.{layer.layer_number - 1}.{rest}"


def local_parameters(model) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(global name, local name, tensor) for every weight this rank holds, including the tied
    output layer copy on the last stage (which megatron keeps as a separate parameter)."""
    model = unwrap_model(model)
    tied = model.share_embeddings_and_output_weights
    for local_name, tensor in model.state_dict(keep_vars=True).items():
        if local_name.endswith("_extra_state") or "inv_freq" in local_name:
            continue
        global_name = _local_to_global_name(model, local_name)
        if global_name == "output_layer.weight" and tied:
            global_name = "embedding.word_embeddings.weight"
        yield global_name, local_name, tensor


def fused_norm_aliases(key: str) -> list[str]:
    """The other spellings of a checkpoint key that names a per-layer norm: the local spec's name for
    a fused (TE) one and the reverse, keeping any prefix (`module.decoder.layers.input_layernorm.weight`
    <-> `module.decoder.layers.self_attention.linear_qkv.layer_norm_weight`)."""
    aliases = []
    for fused, local in _TE_TO_LOCAL.items():
        for mine, other in ((fused, local), (local, fused)):
            if key.endswith(f".{mine}"):
                aliases.append(key[: -len(mine)] + other)
    return aliases


def _tp_axis(global_name: str) -> int | None:
    """The dimension a weight is split on across TP ranks (None: replicated). The QKV bias splits
    like the weight's rows (whole query groups per rank); the q/k norms are replicated; a Mamba
    mixer splits its heads (and their channels, groups and gated-norm weight) over the ranks."""
    if global_name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias",
                             "linear_fc1.weight", *(f"mixer.{p}" for p in MAMBA_PARAMS if p != "out_proj.weight"))):
        return 0
    if global_name.endswith(("linear_proj.weight", "linear_fc2.weight", "mixer.out_proj.weight")):
        return 1
    return None


def row_blocks(global_name: str, arch: ModelArch) -> list[int] | None:
    """The row blocks a tensor is made of, each split over TP on its own (None: one block): a
    SwiGLU fc1's [gate; up] (megatron's partition_stride 2), a Mamba in_proj's [z; x; B; C; dt]
    and conv1d's [x; B; C] (megatron's mixer splits each over the ranks)."""
    if global_name.endswith("mixer.in_proj.weight"):
        return list(arch.mamba_in_proj_blocks.values())
    if global_name.endswith(("mixer.conv1d.weight", "mixer.conv1d.bias")):
        return list(arch.mamba_conv_blocks.values())
    if arch.gated and global_name.endswith("linear_fc1.weight"):
        return [None, None]  # two equal halves, of whatever width this MLP has
    return None


def _blocks(tensor: torch.Tensor, sizes: list[int | None]) -> tuple[torch.Tensor, ...]:
    return tensor.chunk(len(sizes)) if None in sizes else tensor.split(sizes)


def shard(global_name: str, tensor: torch.Tensor, tp_rank: int, tp: int, arch: ModelArch) -> torch.Tensor:
    """The TP shard of a global tensor held by `tp_rank`: its slice of every row block."""
    axis = _tp_axis(global_name)
    if axis is None or tp == 1:
        return tensor
    blocks = row_blocks(global_name, arch)
    if blocks:
        return torch.cat([block.chunk(tp)[tp_rank] for block in _blocks(tensor, blocks)])
    return tensor.chunk(tp, dim=axis)[tp_rank]


def unshard(global_name: str, shards: list[torch.Tensor], arch: ModelArch) -> torch.Tensor:
    """Inverse of `shard` over all TP ranks' shards."""
    axis = _tp_axis(global_name)
    if axis is None or len(shards) == 1:
        return shards[0]
    blocks = row_blocks(global_name, arch)
    if blocks:
        tp = len(shards)
        local = [None if size is None else size // tp for size in blocks]
        pieces = [_blocks(s, local) for s in shards]
        return torch.cat([torch.cat([p[b] for p in pieces]) for b in range(len(blocks))])
    return torch.cat(shards, dim=axis)


@torch.no_grad()
def load_global(model, global_sd: dict[str, torch.Tensor]) -> None:
    """Copy a global state dict into the local shards of `model` on this rank."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    arch = arch_of(model)
    for global_name, local_name, param in local_parameters(model):
        if global_name not in global_sd:
            raise UserError(f"weights for {global_name} (local {local_name}) are missing")
        local = shard(global_name, global_sd[global_name], tp_rank, tp, arch)
        if local.shape != param.shape:
            raise UserError(f"{global_name}: shard shape {tuple(local.shape)} != parameter {tuple(param.shape)}")
        param.copy_(local.to(param.dtype))


@torch.no_grad()
def gather_global(model, grads: bool = False) -> dict[str, torch.Tensor]:
    """The global state dict of a TP x PP model, assembled on every rank (small models: tests,
    reports, single-node export). With `grads=True`, the parameters' `.grad` instead."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp = ps.get_tensor_model_parallel_world_size()
    arch = arch_of(model)
    stage: dict[str, torch.Tensor] = {}
    for global_name, _, param in local_parameters(model):
        if global_name in stage:
            continue
        local = param.grad if grads else param
        if local is None:
            raise ValueError(f"{global_name} has no gradient")
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.detach().contiguous(), group=tp_group)
        stage[global_name] = unshard(global_name, shards, arch).cpu().clone()
    stage = _merge_over(stage, ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_group)
    return _merge_over(stage, ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group)


def _merge_over(part: dict[str, torch.Tensor], size: int, group) -> dict[str, torch.Tensor]:
    """The union of the `part`s of the `size` ranks of `group()` (pipeline stages, or expert-parallel
    ranks, which hold other experts of the same layers), on each of them."""
    if size == 1:
        return part
    parts: list[dict[str, torch.Tensor] | None] = [None] * size
    dist.all_gather_object(parts, part, group=group())
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        for name, tensor in p.items():
            merged.setdefault(name, tensor)
    return merged

