"""Activation hooks on the megatron modules of a GPTModel stage, at any TP x PP x DP.

Where each axis is read (activations are sequence-first [s, b, .]):
- hidden channels: the outputs of the two layer norms of every layer. They are the inputs of
  `linear_qkv` and `linear_fc1`, so one forward pre-hook on each covers both layer specs: in the
  local spec the input already is the norm output; in the Transformer Engine spec the norm is
  fused into the linear (`layer_norm_weight`) and the hook applies it to the input itself.
- attention heads: the input of `linear_proj` (this rank's heads, columns head-major): per
  channel, then L2 over head_dim (`aggregation.heads=input`), or per token the norm of what each
  head adds to the residual stream, |W_o[:, head] x_head|, computed through the head's d x d Gram
  matrix W_o[:, head]^T W_o[:, head] (`aggregation.heads=output`, the default).
- MLP neurons: the input of `linear_fc2` (after the activation, gated or squared ReLU; this rank's
  neurons).
- Block Importance: 1 - cos(input, output) of every `TransformerLayer`, averaged over tokens (the
  layer is called with keyword arguments, hence `with_kwargs=True`).
- Mixture-of-experts layers (local experts, `SequentialMLP`): the hidden channels after the
  pre-MLP norm are the MoE layer's input; the router's output gives each expert's token count
  ("frequency") and received probability ("router_mass"). Megatron scales an expert's activation
  by the token's router probability p before `linear_fc2`, so the input of a routed expert's
  `linear_fc2` is p * act(x): its neuron score is the L2 norm over the tokens routed to it, and
  the expert's score ("output") is the sum over those tokens of |p * expert(x)|, the norm of what
  it adds to the residual stream (its `linear_fc2` output, summed over expert-TP ranks first). The
  all-gather token dispatcher hands every expert each token once per TP rank (tokens are
  replicated across TP without sequence parallelism), so expert statistics are divided by TP.
  A shared expert's neurons are read like a dense MLP's. Grouped-GEMM experts (Transformer
  Engine's `TEGroupedMLP`) compute all local experts in one `linear_fc2` call over the tokens
  sorted by expert, with the per-expert token counts as its second argument: its input and output
  are split by those counts and read per expert as above. Megatron's legacy `GroupedMLP` (the
  `grouped_gemm` package) has no module to hook and is refused.

- Hybrid (Mamba) models: a layer holds one norm (read at the input of its first linear: in_proj,
  linear_qkv or linear_fc1) and one mixer. Mamba channels: the input of `out_proj` (the gated,
  normalised SSM output; this rank's heads, channels head-major), per channel as for neurons;
  a head scores the L2 norm of its channels' scores, a channel index the L2 norm over the heads.

Every rank accumulates into global-size tensors (global layer index, global head / neuron offset);
hidden and layer statistics, replicated across TP, count on TP rank 0 only. One all-reduce over
all ranks then sums DP replicas, joins TP shards and PP stages, and leaves identical scores
everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_minitron.errors import UserError
from nemo_minitron.parallel import sum_over_ranks
from nemo_minitron.importance.aggregation import Aggregation, BatchStats
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.gpt import arch_of, unwrap_model


def _fused_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The norm output a TE `LayerNormColumnParallelLinear` computes internally (not returned)."""
    config = module.config
    weight = module.layer_norm_weight.float()
    if config.layernorm_zero_centered_gamma:
        weight = weight + 1
    x = x.float()
    if config.normalization == "LayerNorm":
        bias = module.layer_norm_bias.float()
        return F.layer_norm(x, (x.shape[-1],), weight, bias, config.layernorm_epsilon)
    if config.normalization != "RMSNorm":
        raise UserError(f"importance hooks support RMSNorm and LayerNorm, not normalization={config.normalization}")
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + config.layernorm_epsilon) * weight


class ImportanceRecorder:
    """Context manager: hooks on while inside, `scores()` afterwards (collective)."""

    def __init__(self, model, aggregation: Aggregation | None = None):
        from megatron.core import parallel_state as ps

        model = unwrap_model(model)
        if model.config.sequence_parallel:
            raise UserError("importance estimation does not support sequence parallelism; run without it")
        self.model = model
        self.arch = arch = arch_of(model)
        self.aggregation = aggregation or Aggregation()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        tp = ps.get_tensor_model_parallel_world_size()
        L, h = arch.num_layers, arch.hidden_size
        self.heads_local = arch.num_attention_heads // tp
        self.ffn_local = arch.ffn_hidden_size // tp
        # [layer, (input_layernorm, pre_mlp_layernorm), h]
        self.hidden = BatchStats((L, 2, h))
        per_head = arch.kv_channels if self.aggregation.heads == "input" else 1
        self.attention = BatchStats((L, arch.num_attention_heads * per_head))
        self._grams: dict[int, torch.Tensor] = {}
        self.bi_sum = torch.zeros(L, dtype=torch.float64)
        self.bi_tokens = torch.zeros(L, dtype=torch.float64)
        self._handles: list = []
        if arch.is_hybrid:
            self.mamba_local = arch.mamba_inner // tp
            self.mamba = BatchStats((L, arch.mamba_inner))
        if not arch.is_moe:
            self.neurons = BatchStats((L, arch.ffn_hidden_size))
            return
        unhookable = [type(layer.mlp.experts).__name__ for layer in model.decoder.layers
                      if not hasattr(layer.mlp.experts, "local_experts") and not hasattr(layer.mlp.experts, "linear_fc2")]
        if unhookable:  # checked before any hook is registered
            raise UserError(f"importance hooks read routed experts through their linear_fc2 modules (megatron's "
                            f"SequentialMLP or Transformer Engine's TEGroupedMLP); this model's are {unhookable[0]} "
                            f"(legacy grouped GEMM): build it with moe_use_legacy_grouped_gemm=False, or "
                            f"moe_grouped_gemm=False, to estimate importance")
        E = arch.num_moe_experts
        self.duplicates = tp
        self.etp_rank = ps.get_expert_tensor_parallel_rank()
        self.etp = ps.get_expert_tensor_parallel_world_size()
        self.expert_ffn_local = arch.moe_ffn_hidden_size // self.etp
        # sums over routed tokens: (p * act)^2 per expert neuron, |p * expert(x)|, tokens, p
        self.expert_neurons_sq = torch.zeros(L, E, arch.moe_ffn_hidden_size, dtype=torch.float64)
        self.expert_output = torch.zeros(L, E, dtype=torch.float64)
        self.expert_tokens = torch.zeros(L, E, dtype=torch.float64)
        self.router_mass = torch.zeros(L, E, dtype=torch.float64)
        shared = arch.moe_shared_expert_intermediate_size
        self.shared_local = (shared or 0) // tp
        self.shared = BatchStats((L, shared)) if shared else None

    # --- hooks ----------------------------------------------------------------------------------

    def _norm_hook(self, layer: int, which: int):
        def hook(module, args):
            x = args[0]
            if getattr(module, "layer_norm_weight", None) is not None:
                x = _fused_norm(module, x)
            if self.tp_rank == 0:
                self.hidden.add(layer, self.aggregation.over_sequence(x), (which,))
                if which == 0:
                    self.hidden.count_samples(layer, x.shape[1])

        return hook

    def _sharded_hook(self, stats: BatchStats, layer: int, local_width: int):
        offset = self.tp_rank * local_width

        def hook(module, args):
            x = args[0]
            stats.add(layer, self.aggregation.over_sequence(x), slice(offset, offset + local_width))
            if self.tp_rank == 0:
                stats.count_samples(layer, x.shape[1])

        return hook

    def _gram(self, layer: int, linear_proj) -> torch.Tensor:
        """[local heads, d, d] Gram matrices of this rank's heads' output projections (cached:
        the weights do not change while recording)."""
        if layer not in self._grams:
            w = linear_proj.weight.detach().float().view(linear_proj.weight.shape[0], self.heads_local, -1)
            self._grams[layer] = torch.einsum("ohd,ohe->hde", w, w)
        return self._grams[layer]

    def _head_hook(self, layer: int):
        if self.aggregation.heads == "input":
            return self._sharded_hook(self.attention, layer, self.heads_local * self.arch.kv_channels)
        offset = self.tp_rank * self.heads_local

        def hook(module, args):
            x = args[0].float()
            s, b, _ = x.shape
            x = x.reshape(s, b, self.heads_local, -1)
            # |W_h x_h|^2 = x_h^T (W_h^T W_h) x_h, without the [s, b, heads, hidden] intermediate
            contribution = (torch.einsum("sbhd,hde->sbhe", x, self._gram(layer, module)) * x).sum(-1)
            self.attention.add(layer, self.aggregation.over_sequence(contribution.clamp(min=0).sqrt()),
                               slice(offset, offset + self.heads_local))
            if self.tp_rank == 0:
                self.attention.count_samples(layer, b)

        return hook

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            probs, routing_map = output  # [tokens, E]: the weights of the chosen experts (0 elsewhere)
            if self.tp_rank == 0:  # the router runs on this rank's tokens, replicated across TP
                self.router_mass[layer] += probs.detach().double().sum(0).cpu()
                self.expert_tokens[layer] += routing_map.double().sum(0).cpu()

        return hook

    def _add_expert_neurons(self, layer: int, expert: int, scaled: torch.Tensor) -> None:
        """`scaled`: [tokens routed to `expert`, this rank's expert FFN] = p * act(x)."""
        offset = self.etp_rank * self.expert_ffn_local
        self.expert_neurons_sq[layer, expert, offset:offset + self.expert_ffn_local] += (
            scaled.detach().double().square().sum(0).cpu() / self.duplicates)

    def _expert_fc2_output(self, output) -> torch.Tensor | None:
        """What routed experts' `linear_fc2` adds to the residual stream: the output summed over
        expert-TP ranks (row-parallel partial sums; collective), on expert-TP rank 0, else None."""
        from megatron.core import parallel_state as ps

        out = (output[0] if isinstance(output, tuple) else output).detach().float()
        if self.etp > 1:
            out = out.clone()
            dist.all_reduce(out, group=ps.get_expert_tensor_parallel_group())
        return out if self.etp_rank == 0 else None

    def _add_expert_output(self, layer: int, expert: int, out: torch.Tensor) -> None:
        self.expert_output[layer, expert] += out.norm(dim=-1).double().sum().cpu() / self.duplicates

    def _expert_neuron_hook(self, layer: int, expert: int):
        def hook(module, args):
            self._add_expert_neurons(layer, expert, args[0])

        return hook

    def _expert_output_hook(self, layer: int, expert: int):
        def hook(module, args, output):
            out = self._expert_fc2_output(output)
            if out is not None:
                self._add_expert_output(layer, expert, out)

        return hook

    def _grouped_neuron_hook(self, layer: int, experts: list[int]):
        """`linear_fc2(x, tokens_per_expert)` of grouped experts: x's rows by local expert."""
        def hook(module, args):
            for expert, chunk in zip(experts, torch.split(args[0], list(args[1]))):
                self._add_expert_neurons(layer, expert, chunk)

        return hook

    def _grouped_output_hook(self, layer: int, experts: list[int]):
        def hook(module, args, output):
            out = self._expert_fc2_output(output)
            if out is not None:
                for expert, chunk in zip(experts, torch.split(out, list(args[1]))):
                    self._add_expert_output(layer, expert, chunk)

        return hook

    def _moe_hooks(self, layer: int, mlp) -> list:
        """The hooks of one MoE layer (its hidden-channel hook included)."""
        handles = [mlp.register_forward_pre_hook(self._moe_input_hook(layer), with_kwargs=True),
                   mlp.router.register_forward_hook(self._router_hook(layer))]
        if hasattr(mlp.experts, "local_experts"):
            for local_index, expert in enumerate(mlp.experts.local_experts):
                index = mlp.local_expert_indices[local_index]
                handles += [expert.linear_fc2.register_forward_pre_hook(self._expert_neuron_hook(layer, index)),
                            expert.linear_fc2.register_forward_hook(self._expert_output_hook(layer, index))]
        else:  # grouped GEMM: one linear_fc2 for this rank's experts, in local_expert_indices order
            fc2, indices = mlp.experts.linear_fc2, list(mlp.local_expert_indices)
            handles += [fc2.register_forward_pre_hook(self._grouped_neuron_hook(layer, indices)),
                        fc2.register_forward_hook(self._grouped_output_hook(layer, indices))]
        if self.shared is not None:
            handles.append(mlp.shared_experts.linear_fc2.register_forward_pre_hook(
                self._sharded_hook(self.shared, layer, self.shared_local)))
        return handles

    def _moe_input_hook(self, layer: int):
        norm_hook = self._norm_hook(layer, 1)

        def hook(module, args, kwargs):
            norm_hook(module, args or (kwargs["hidden_states"],))

        return hook

    def _block_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if self.tp_rank != 0:
                return
            inputs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            outputs = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
            self.bi_sum[layer] += (1 - cos).double().sum().cpu()
            self.bi_tokens[layer] += cos.numel()

        return hook

    def _hybrid_hooks(self, i: int, layer) -> list:
        """The hooks of one hybrid layer: its norm (slot 0) at its first linear, and its mixer's units."""
        handles = [layer.register_forward_hook(self._block_hook(i), with_kwargs=True)]
        if hasattr(layer, "mixer"):  # Mamba
            return handles + [
                layer.mixer.in_proj.register_forward_pre_hook(self._norm_hook(i, 0)),
                layer.mixer.out_proj.register_forward_pre_hook(self._sharded_hook(self.mamba, i, self.mamba_local))]
        if self.arch.layer_types[i] == "attention":
            return handles + [layer.self_attention.linear_qkv.register_forward_pre_hook(self._norm_hook(i, 0)),
                              layer.self_attention.linear_proj.register_forward_pre_hook(self._head_hook(i))]
        return handles + [layer.mlp.linear_fc1.register_forward_pre_hook(self._norm_hook(i, 0)),
                          layer.mlp.linear_fc2.register_forward_pre_hook(self._sharded_hook(self.neurons, i, self.ffn_local))]

    def __enter__(self) -> "ImportanceRecorder":
        self._grams.clear()
        for layer in self.model.decoder.layers:
            i = layer.layer_number - 1
            if self.arch.is_hybrid:
                self._handles += self._hybrid_hooks(i, layer)
                continue
            attention, mlp = layer.self_attention, layer.mlp
            self._handles += [
                attention.linear_qkv.register_forward_pre_hook(self._norm_hook(i, 0)),
                attention.linear_proj.register_forward_pre_hook(self._head_hook(i)),
                layer.register_forward_hook(self._block_hook(i), with_kwargs=True),
            ]
            if self.arch.is_moe:
                self._handles += self._moe_hooks(i, mlp)
            else:
                self._handles += [
                    mlp.linear_fc1.register_forward_pre_hook(self._norm_hook(i, 1)),
                    mlp.linear_fc2.register_forward_pre_hook(self._sharded_hook(self.neurons, i, self.ffn_local)),
                ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- result ---------------------------------------------------------------------------------

    def scores(self, info: dict | None = None) -> ImportanceScores:
        """Reduce over all ranks and finish the scores (every rank must call it)."""
        arch, agg = self.arch, self.aggregation
        if arch.is_moe:
            mlp_parts = [self.expert_neurons_sq, self.expert_output, self.expert_tokens, self.router_mass,
                         *(self.shared.tensors() if self.shared is not None else ())]
        else:
            mlp_parts = [*self.neurons.tensors()]
        if arch.is_hybrid:
            mlp_parts += self.mamba.tensors()
        parts = [*self.hidden.tensors(), *self.attention.tensors(), *mlp_parts, self.bi_sum, self.bi_tokens]
        flat = sum_over_ranks(torch.cat([p.flatten() for p in parts]))
        for p, chunk in zip(parts, flat.split([p.numel() for p in parts])):
            p.copy_(chunk.view_as(p))
        if (self.hidden.count == 0).any():
            raise UserError("no calibration data reached some layers: run forward passes inside the recorder")
        hidden_per_layer = agg.over_batch(self.hidden).float()
        heads = agg.over_batch(self.attention).float().view(arch.num_layers, arch.num_attention_heads, -1)
        mamba = {}
        if arch.is_hybrid:  # [L, heads, channels] per-channel scores: L2 within a head, across the heads
            channels = agg.over_batch(self.mamba).float().view(arch.num_layers, arch.mamba_num_heads, -1)
            mamba = {"mamba_heads": channels.norm(dim=2), "mamba_channels": channels.norm(dim=1)}
        return ImportanceScores(
            arch=arch,
            method="activation",
            hidden=hidden_per_layer.sum((0, 1)),
            heads=heads.norm(dim=-1),  # "input": L2 over head_dim of the per-channel scores
            neurons=self.expert_neurons_sq.sqrt().float() if arch.is_moe else agg.over_batch(self.neurons).float(),
            layers={"block_importance": (self.bi_sum / self.bi_tokens).float()},
            experts={"output": self.expert_output.float(), "frequency": self.expert_tokens.float(),
                     "router_mass": self.router_mass.float()} if arch.is_moe else {},
            shared_neurons=agg.over_batch(self.shared).float() if arch.is_moe and self.shared is not None else None,
            hidden_per_layer=hidden_per_layer,
            **mamba,
            info={"aggregation": agg.as_dict(), "samples": int(self.hidden.count[0]), **(info or {})},
        )
