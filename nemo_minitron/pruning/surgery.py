"""Width and depth surgery on Megatron weights.

`prune_global` is a pure function over the global layout (megatron names, TP=1 shapes, see
`models/bridge.py`) and index sets:
- one shared hidden-channel order for the embedding, every norm (weight, and bias for LayerNorm),
  every linear's hidden side, the final norm and the output layer;
- QKV is group-major [per group: q heads, k, v]: kept groups are selected, then the kept q heads
  of each group, always with the group's k and v; `linear_proj` keeps the matching head columns;
  Qwen2's QKV bias keeps the same rows as the weight (a head's bias goes with it);
- Qwen3's query/key norm weights are over head_dim, which no prune changes, and shared by the
  heads of a layer: they are kept whole whatever heads or hidden channels go;
- SwiGLU `linear_fc1` is [gate; up]: a neuron keeps its gate row and its up row (squared ReLU:
  its one row), plus its `linear_fc2` column;
- an MoE layer keeps the router rows of its kept experts (renumbered 0..E'-1 in their original
  order, so top-k routing among them is unchanged), each kept expert its own kept neurons as above,
  and the shared expert its kept neurons and the hidden columns of its gate;
- a hybrid's Mamba layer keeps, of every kept head, the kept channels: the d_in indices
  head * head_dim + channel select the rows of in_proj's z and x blocks, conv1d's x channels, the
  gated norm's weight and out_proj's columns; a kept head keeps its dt row of in_proj and its
  dt_bias, A_log and D; B and C (per SSM group, and every group stays) are kept whole. Heads
  leave within their groups, the same number from each, so the gated norm still normalises each
  group's channels (now fewer) together;
- dropped layers disappear and the survivors are renumbered 0..L'-1 (a hybrid's pattern loses
  their symbols).
`prune_model` applies it to a live model at any TP x PP: gather the global state dict, prune it,
build the pruned model of the same class and layer spec for the current layout (megatron splits
the new layer count evenly over the pipeline stages) and load the shards. Memory: every rank briefly holds the teacher's global
state dict and the pruned one (fine for the models this runs on in one node; a per-stage variant
would be needed for models that do not fit in host memory twice).
"""

from __future__ import annotations

import logging

import torch

from nemo_minitron.models import bridge
from nemo_minitron.models.config import ModelArch
from nemo_minitron.pruning.indices import PruneIndices
from nemo_minitron.pruning.reconstruct import Reconstruction, check_options

log = logging.getLogger("nemo_minitron")


def keep_qkv_heads(qkv: torch.Tensor, heads: torch.Tensor, teacher: ModelArch) -> torch.Tensor:
    """The rows of a group-major linear_qkv weight ([rows, h]) or bias ([rows]) that the kept
    `heads` ([G', h'] global head indices, group-major) need: per kept group, its kept q heads
    then its k and v heads, in that order (the pruned model's group-major layout)."""
    G, d = teacher.num_query_groups, teacher.kv_channels
    per_group = teacher.num_attention_heads // G
    groups = heads[:, 0] // per_group
    # rows of each kept group: its kept q heads, then k (index per_group) and v (per_group + 1)
    kv = torch.tensor([per_group, per_group + 1]).expand(len(groups), 2)
    rows = torch.cat([heads % per_group, kv], dim=1)
    rest = qkv.shape[1:]
    return qkv.view(G, per_group + 2, d, *rest)[groups[:, None], rows].reshape(-1, *rest)


def keep_mlp(sd: dict[str, torch.Tensor], src: str, dst: str, neurons: torch.Tensor, hidden: torch.Tensor,
             gated: bool) -> dict[str, torch.Tensor]:
    """The kept `neurons` and `hidden` channels of the MLP at `src` (a dense MLP, a routed or the
    shared expert), named at `dst`: a neuron's gate and up rows of `linear_fc1` (or its one row)
    and its `linear_fc2` column."""
    fc1 = sd[src + "linear_fc1.weight"]
    fc1 = torch.cat([part[neurons] for part in fc1.chunk(2)]) if gated else fc1[neurons]
    return {dst + "linear_fc1.weight": fc1[:, hidden], dst + "linear_fc2.weight": sd[src + "linear_fc2.weight"][hidden][:, neurons]}


def mamba_inner_channels(heads: torch.Tensor, channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The d_in indices (head-major: head * head_dim + channel) of the kept `channels` of every
    kept head (`heads` [G, h'] group-major, so in ascending order)."""
    return (heads.flatten()[:, None] * head_dim + channels[None, :]).flatten()


def keep_mamba(sd: dict[str, torch.Tensor], src: str, dst: str, heads: torch.Tensor, channels: torch.Tensor,
               hidden: torch.Tensor, teacher: ModelArch) -> dict[str, torch.Tensor]:
    """The kept heads, head channels and `hidden` channels of the Mamba layer at `src`, named at `dst`."""
    inner = mamba_inner_channels(heads, channels, teacher.mamba_head_dim)
    kept_heads = heads.flatten()
    keep = {"z": inner, "x": inner, "B": slice(None), "C": slice(None), "dt": kept_heads}
    m, out = src + "mixer.", {}
    blocks = sd[m + "in_proj.weight"].split(list(teacher.mamba_in_proj_blocks.values()))
    out[dst + "mixer.in_proj.weight"] = torch.cat([block[keep[name]] for name, block in
                                                   zip(teacher.mamba_in_proj_blocks, blocks)])[:, hidden]
    for param in ("weight", "bias"):
        blocks = sd[f"{m}conv1d.{param}"].split(list(teacher.mamba_conv_blocks.values()))
        out[f"{dst}mixer.conv1d.{param}"] = torch.cat([block[keep[name]] for name, block in
                                                       zip(teacher.mamba_conv_blocks, blocks)])
    for name in ("dt_bias", "A_log", "D"):
        out[f"{dst}mixer.{name}"] = sd[m + name][kept_heads]
    out[dst + "mixer.norm.weight"] = sd[m + "norm.weight"][inner]
    out[dst + "mixer.out_proj.weight"] = sd[m + "out_proj.weight"][hidden][:, inner]
    return out


def merge_pruned_heads(proj: torch.Tensor, kept: torch.Tensor, per_group: int) -> torch.Tensor:
    """The head "residual" option: fold each pruned head's output projection into a kept head of
    the same query group ([h, heads, d] -> same shape, new tensor).

    Heads of a group share keys and values, so a pruned head's contribution is approximated by
    routing it through a kept head's attention pattern. Pruned heads are paired with the kept
    heads of their group round-robin, in index order; whole pruned groups have no partner.
    """
    proj = proj.clone()
    for row in kept.tolist():
        group = row[0] // per_group
        pruned = [j for j in range(group * per_group, (group + 1) * per_group) if j not in row]
        for n, j in enumerate(pruned):
            proj[:, row[n % len(row)]] += proj[:, j]
    return proj


@torch.no_grad()
def prune_global(
    sd: dict[str, torch.Tensor],
    teacher: ModelArch,
    target: ModelArch,
    indices: PruneIndices,
    head_residual: bool = False,
) -> dict[str, torch.Tensor]:
    """The global state dict of the pruned model."""
    hid = indices.hidden
    G, d, h = teacher.num_query_groups, teacher.kv_channels, teacher.hidden_size
    per_group = teacher.num_attention_heads // G
    out = {"embedding.word_embeddings.weight": sd["embedding.word_embeddings.weight"][:, hid]}
    final = bridge.final_norm(teacher)
    for param in teacher.norm_params:
        out[f"{final}{param}"] = sd[f"{final}{param}"][hid]
    if not teacher.tie_embeddings:
        out["output_layer.weight"] = sd["output_layer.weight"][:, hid]
    for new, old in enumerate(indices.layers):
        src, dst = f"decoder.layers.{old}.", f"decoder.layers.{new}."
        for norm in bridge.layer_norms(teacher, old):
            for param in teacher.norm_params:
                out[f"{dst}{norm}{param}"] = sd[f"{src}{norm}{param}"][hid]
        kind = teacher.layer_types[old]
        if kind == "mamba":
            out |= keep_mamba(sd, src, dst, indices.mamba_heads[old], indices.mamba_channels[old], hid, teacher)
            continue
        if kind == "mlp":
            out |= keep_mlp(sd, src + "mlp.", dst + "mlp.", indices.neurons[old], hid, teacher.gated)
            continue

        heads = indices.heads[old]
        for param in bridge.qkv_params(teacher):  # a head's bias rows go with its weight rows
            qkv = keep_qkv_heads(sd[f"{src}self_attention.linear_qkv.{param}"], heads, teacher)
            out[f"{dst}self_attention.linear_qkv.{param}"] = qkv[:, hid] if param == "weight" else qkv
        if teacher.qk_norm:  # over head_dim and shared by the layer's heads: kept whole
            for norm in ("q_layernorm", "k_layernorm"):
                out[f"{dst}self_attention.{norm}.weight"] = sd[f"{src}self_attention.{norm}.weight"]
        proj = sd[src + "self_attention.linear_proj.weight"].view(h, teacher.num_attention_heads, d)
        if head_residual:
            proj = merge_pruned_heads(proj, heads, per_group)
        out[dst + "self_attention.linear_proj.weight"] = proj[hid][:, heads.flatten()].reshape(len(hid), -1)

        if kind == "attention":
            continue
        if not teacher.is_moe:
            out |= keep_mlp(sd, src + "mlp.", dst + "mlp.", indices.neurons[old], hid, teacher.gated)
            continue
        experts = indices.experts[old]
        out[dst + "mlp.router.weight"] = sd[src + "mlp.router.weight"][experts][:, hid]
        for new_e, (old_e, neurons) in enumerate(zip(experts.tolist(), indices.neurons[old])):
            out |= keep_mlp(sd, f"{src}mlp.experts.local_experts.{old_e}.", f"{dst}mlp.experts.local_experts.{new_e}.",
                            neurons, hid, teacher.gated)
        if teacher.moe_shared_expert_intermediate_size:
            out |= keep_mlp(sd, src + "mlp.shared_experts.", dst + "mlp.shared_experts.",
                            indices.shared_neurons[old], hid, teacher.gated)
            out[dst + "mlp.shared_experts.gate_weight"] = sd[src + "mlp.shared_experts.gate_weight"][:, hid]

    expected = bridge.expected_global_shapes(target)
    if expected.keys() != out.keys():
        differ = sorted(expected.keys() ^ out.keys())[:4]
        raise ValueError(f"pruned state dict names differ from the target's: {differ}")
    for name, shape in expected.items():
        if tuple(out[name].shape) != shape:
            raise ValueError(f"pruned {name} has shape {tuple(out[name].shape)}, the target architecture needs {shape}")
    return {k: v.contiguous() for k, v in out.items()}


def prune_model(model, target: ModelArch, indices: PruneIndices, head_residual: bool = False,
                reconstruction: Reconstruction | None = None, bridge_loss=None):
    """The pruned model for the current TP x PP layout (collective: every rank calls it), its kept
    consumer columns refit first when a `reconstruction` is given.

    With `bridge_loss` (model -> loss, lower is better, the same on every rank, e.g. `loss_metric`)
    the reconstruction's depth bridges are checked on the pruned model, since a bridge can do harm
    that the refit's calibration error does not show: starting from every bridge, each in layer
    order is left out once and stays out if that lowers the loss. n bridges cost n + 1 loads and
    evaluations of the pruned model; `reconstruction.bridge_checks` records them."""
    from nemo_minitron.models.gpt import arch_of, rebuild_gpt_model

    teacher = arch_of(model)
    sd = bridge.gather_global(model)
    if reconstruction is not None:
        check_options(reconstruction.ridge, head_residual)
    pruned = rebuild_gpt_model(model, target)

    def load(bridges: set[int] | None = None) -> None:
        refit_sd = sd if reconstruction is None else reconstruction.apply(sd, indices, teacher, bridges)
        bridge.load_global(pruned, prune_global(refit_sd, teacher, target, indices, head_residual))

    load()
    if reconstruction is not None and reconstruction.bridges and bridge_loss is not None:
        reconstruction.bridge_checks = check_bridges(reconstruction.bridges, load, lambda: bridge_loss(pruned))
    return pruned


def check_bridges(bridges: dict[int, int], load, loss) -> list[dict]:
    """Greedy, in layer order: with the bridges `kept` loaded (all at first), `load(kept - {layer})`
    and keep that if `loss()` falls; the winner is loaded at the end. One record per bridge."""
    kept, best, checks = set(bridges), loss(), []
    for layer in sorted(bridges):
        load(kept - {layer})
        without = loss()
        checks.append({"layer": layer, "dropped": [layer + 1, bridges[layer]], "loss_with": best,
                       "loss_without": without, "kept": without >= best})
        log.info("reconstruct_depth: the bridge from layer %d over layers %d-%d: calibration loss %.4f with it, "
                 "%.4f without: %s", layer, layer + 1, bridges[layer], best, without,
                 "kept" if without >= best else "left out")
        if without < best:
            kept, best = kept - {layer}, without
    if not checks[-1]["kept"]:
        return checks  # the last trial is the winner, loaded
    load(kept)
    return checks
