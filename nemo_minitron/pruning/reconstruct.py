"""Post-prune reconstruction: refit the weights that consume a pruned axis, in closed form.

Width pruning removes MLP neurons (the columns of `linear_fc2`), attention heads (the columns
of `linear_proj`) and a hybrid's Mamba heads and head channels (the columns of `out_proj`). What
the removed columns added to the residual stream is lost; part of it is carried by the kept
columns' inputs, which are correlated with the removed ones. Per kept layer and consumer, with
a = the consumer's input on a calibration token as the pruned layer computes it (the activated
neurons, the concatenated head outputs, or the Mamba layer's gated norm over its kept channels),
K its kept and P its pruned entries, y = W a the teacher's output and W_K the kept columns, the
refit kept columns are the proximal ridge least squares

    W' = argmin_V  sum_tokens |y - V a_K|^2 + lam |V - W_K|^2
       = (S + lam W_K) (C + lam I)^-1,   C = sum a_K a_K^T,  S = sum y a_K^T,
    lam = ridge * mean(diag C).

The ridge pulls towards the plain prune, not towards zero: `ridge` -> infinity is today's prune,
0 the unregularised fit. Since W' minimises error + penalty and W_K has no penalty, the
calibration error |Y - W' A_K|^2 never exceeds the plain prune's (it falls by at least lam
|W' - W_K|^2). Only the kept rows of W' survive a hidden-channel cut; the hidden axis itself and
dropped layers are not refit (their consumers sit behind a norm or a whole block).

A depth bridge (`bridge=True`) refits the MLP of the kept layer just before a run of dropped layers
to y + (h_after_run - h_before_run): its own output plus what the run added to the residual
stream. Its statistics share C with the plain refit, so the recorder also keeps S and sum |y|^2
of the plain target (`unbridged`), and `prune_model` can try the pruned model with and without
each bridge: a lower calibration error of the refit weight does not mean a better model, since a
block's change may be no function of the MLP's kept neurons.

A Mamba layer's `out_proj` reads the gated group RMSNorm of the scan output y and gate z,
RMSNorm_g(y * silu(z)) * w, over every channel of an SSM group. The pruned layer normalises each
group over its kept channels only, so its input is not the teacher's input restricted to K: the
recorder takes (y, z) at the norm (megatron's unfused path, `use_mem_eff_path=False`, calls it as
a module; the fused kernel computes the same) and recomputes the norm over the kept channels with
their weights, which is what the pruned `out_proj` receives.

The statistics are the teacher's own: one calibration pass over the unpruned model (any TP x PP
x DP), before the surgery. `C` and `S` are sums over tokens, so they reduce like the importance
statistics: a consumer's input is gathered over its TP shards, TP rank 0 accumulates (the output
y is already summed over TP), and one sum over all ranks joins DP replicas and PP stages. Host
memory: 8 * (K^2 + h K + 1) bytes per refit consumer in float64 (h = hidden size, K = kept
neurons, or kept heads x head_dim); Llama-3.1-8B's FFN 14336 -> 9216 takes 0.98 GB per layer.
Mixture-of-experts layers are refused (each routed expert would need its own statistics).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import LAYER_PARTS, MAMBA_NORM_EPS, ModelArch
from nemo_minitron.models.gpt import arch_of, unwrap_model
from nemo_minitron.models.mamba_kernels import gated_rms_norm
from nemo_minitron.parallel import sum_over_ranks
from nemo_minitron.pruning.indices import PruneIndices

log = logging.getLogger("nemo_minitron")

# consumer -> the weight it refits (megatron names inside decoder.layers.N.)
CONSUMERS = {"mlp": "mlp.linear_fc2.weight", "attention": "self_attention.linear_proj.weight",
             "mamba": "mixer.out_proj.weight"}


def kept_columns(indices: PruneIndices, layer: int, consumer: str, arch: ModelArch) -> torch.Tensor:
    """The consumer's kept input columns (global, ascending): the kept neurons, every channel of
    the kept heads (head-major: head j owns columns j * d .. j * d + d - 1), or a Mamba layer's
    kept channels of its kept heads (head j, channel c: column j * P + c)."""
    if consumer == "mlp":
        return indices.neurons[layer]
    if consumer == "mamba":
        heads = indices.mamba_heads[layer].flatten()
        return (heads[:, None] * arch.mamba_head_dim + indices.mamba_channels[layer]).flatten()
    heads = indices.heads[layer].flatten()
    return (heads[:, None] * arch.kv_channels + torch.arange(arch.kv_channels)).flatten()


@dataclass
class Statistics:
    """Sums over calibration tokens for one consumer: C = sum a_K a_K^T [K, K], S = sum y a_K^T
    [h, K], and sum |y|^2 (for the relative error)."""

    gram: torch.Tensor
    cross: torch.Tensor
    output_sq: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.gram, self.cross, self.output_sq]

    def error(self, weight: torch.Tensor) -> float:
        """sum |y - weight a_K|^2 / sum |y|^2 on the calibration tokens."""
        w = weight.double()
        residual = self.output_sq - 2 * (w * self.cross).sum() + (w @ self.gram * w).sum()
        return float(residual / self.output_sq)


def refit(weight_kept: torch.Tensor, stats: Statistics, ridge: float) -> torch.Tensor:
    """(S + lam W_K)(C + lam I)^-1 with lam = ridge * mean(diag C), in float64, returned in the
    weight's dtype. C + lam I is symmetric positive definite for any ridge > 0 (Cholesky)."""
    w = weight_kept.double()
    lam = ridge * stats.gram.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny)
    system = stats.gram + lam * torch.eye(len(stats.gram), dtype=torch.float64)
    rhs = stats.cross + lam * w
    # V system = rhs  <=>  system V^T = rhs^T (system is symmetric)
    solution = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(system)).T
    return solution.to(weight_kept.dtype)


def refit_global(sd: dict[str, torch.Tensor], indices: PruneIndices, statistics: dict[tuple[int, str], Statistics],
                 arch: ModelArch, ridge: float) -> tuple[dict[str, torch.Tensor], dict]:
    """A copy of the teacher's global state dict whose kept consumer columns are refit (the
    surgery then selects them as usual), and per consumer the calibration error before and after."""
    out = dict(sd)
    errors: dict[str, dict[str, list[float]]] = {}
    for (layer, consumer), stats in sorted(statistics.items()):
        name = f"decoder.layers.{layer}.{CONSUMERS[consumer]}"
        columns = kept_columns(indices, layer, consumer, arch)
        before = sd[name][:, columns]
        after = refit(before, stats, ridge)
        out[name] = sd[name].clone()
        out[name][:, columns] = after
        record = errors.setdefault(consumer, {"layers": [], "before": [], "after": []})
        record["layers"].append(layer)
        record["before"].append(round(stats.error(before), 6))
        record["after"].append(round(stats.error(after), 6))
    return out, errors


def _tokens(output) -> torch.Tensor:
    """[tokens, h] float32 copy of a module's output (or of the first element of its tuple): a
    copy, as megatron may later update the tensor in place."""
    y = (output[0] if isinstance(output, tuple) else output).detach()
    return y.reshape(-1, y.shape[-1]).to(torch.float32, copy=True)


def dropped_runs(indices: PruneIndices, arch: ModelArch) -> dict[int, int]:
    """{kept layer just before a run of dropped layers: the run's last layer}, for the kept layers
    with an MLP (a run at the very start has no layer before it, and a hybrid's run after a Mamba
    or attention layer has no MLP to bridge it: both are left out)."""
    kept, num_layers, kinds = set(indices.layers), arch.num_layers, arch.layer_types
    runs = {}
    for layer in range(1, num_layers):
        if layer not in kept and layer - 1 in kept and "mlp" in LAYER_PARTS[kinds[layer - 1]]:
            end = layer
            while end + 1 < num_layers and end + 1 not in kept:
                end += 1
            runs[layer - 1] = end
    return runs


def check_options(ridge: float, head_residual: bool) -> None:
    """Refuse settings reconstruction cannot take (before any calibration work)."""
    if not ridge > 0:
        raise UserError(f"reconstruct_ridge={ridge} must be > 0 (it keeps the least-squares system solvable)")
    if head_residual:
        raise UserError("head_residual=true and reconstruct=true both rewrite linear_proj's kept heads: choose one")


def check_reconstructable(arch) -> None:
    """Refuse models whose consumers are not refit here (before any calibration work)."""
    if arch.is_moe:
        raise UserError("reconstruct=true refits dense MLPs, attention and Mamba mixers; this model's MLPs are "
                        "mixtures of experts: prune it with reconstruct=false")


class ReconstructionRecorder:
    """Context manager: on the unpruned model, accumulates every kept layer's `Statistics` for the
    kept columns of `indices`; `statistics()` afterwards (collective)."""

    def __init__(self, model, indices: PruneIndices, consumers: tuple[str, ...] = tuple(CONSUMERS),
                 bridge: bool = False):
        from megatron.core import parallel_state as ps

        model = unwrap_model(model)
        self.arch = arch = arch_of(model)
        check_reconstructable(arch)
        if model.config.sequence_parallel:
            raise UserError("reconstruction does not support sequence parallelism; run without it")
        unknown = set(consumers) - set(CONSUMERS)
        if unknown:
            raise UserError(f"reconstruction consumers {sorted(unknown)} are not among {list(CONSUMERS)}")
        self.model, self.indices = model, indices
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.layers = {layer.layer_number - 1: layer for layer in model.decoder.layers}
        self.bridges = self._within_stages(dropped_runs(indices, arch)) if bridge and "mlp" in consumers else {}
        widths = {"mlp": arch.ffn_hidden_size, "attention": arch.num_attention_heads * arch.kv_channels,
                  "mamba": arch.mamba_inner if arch.is_hybrid else 0}
        h = arch.hidden_size
        self.stats: dict[tuple[int, str], Statistics] = {}
        for layer in indices.layers:
            for consumer in [c for c in LAYER_PARTS[arch.layer_types[layer]] if c in consumers]:
                k = len(kept_columns(indices, layer, consumer, arch))
                if k == widths[consumer] and not (consumer == "mlp" and layer in self.bridges):
                    continue  # nothing of its input was pruned: the refit would return it unchanged
                self.stats[layer, consumer] = Statistics(
                    torch.zeros(k, k, dtype=torch.float64), torch.zeros(h, k, dtype=torch.float64),
                    torch.zeros((), dtype=torch.float64))
        # a bridged MLP's statistics without its bridge (the same input, so the same gram), where its
        # neurons were pruned: without the bridge a full-width MLP keeps its weights
        self.unbridged: dict[int, Statistics] = {}
        for layer in self.bridges:
            gram = self.stats[layer, "mlp"].gram
            if len(gram) < widths["mlp"]:
                self.unbridged[layer] = Statistics(gram, torch.zeros(h, len(gram), dtype=torch.float64),
                                                   torch.zeros((), dtype=torch.float64))
        self._pending: dict = {}
        self._handles: list = []
        self._mixers_fused: dict = {}  # Mamba mixer -> its use_mem_eff_path, restored on exit

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, full width] from this rank's [s, b, width / tp] shard (collective over TP)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.tp == 1:
            return x
        shards = [torch.empty_like(x) for _ in range(self.tp)]
        dist.all_gather(shards, x.contiguous(), group=self.tp_group)
        return torch.cat(shards, dim=1)

    def _input_hook(self, key: tuple[int, str]):
        columns = kept_columns(self.indices, key[0], key[1], self.arch)

        def hook(module, args):
            kept = self._gather(args[0])[:, columns.to(args[0].device)]
            self._add_input(key, kept)

        return hook

    def _mamba_norm_hook(self, key: tuple[int, str]):
        """At a Mamba layer's gated norm (y, z): the pruned layer's `out_proj` input, the norm over
        each SSM group's kept channels with their weights (module docstring)."""
        columns = kept_columns(self.indices, key[0], key[1], self.arch)
        group_size = len(columns) // self.arch.mamba_num_groups  # kept heads are group-major, as many per group

        def hook(module, args):
            y, z = args[0], args[1]
            device_columns = columns.to(y.device)
            weight = self._gather(module.weight[None])[0, device_columns]
            kept = gated_rms_norm(self._gather(y)[:, device_columns], weight, self._gather(z)[:, device_columns],
                                  MAMBA_NORM_EPS, group_size, norm_before_gate=False)
            self._add_input(key, kept)

        return hook

    def _add_input(self, key: tuple[int, str], kept: torch.Tensor) -> None:
        if self.tp_rank == 0:
            self._pending[key] = kept
            self.stats[key].gram += (kept.T @ kept).double().cpu()

    @staticmethod
    def _accumulate(stats: Statistics, target: torch.Tensor, kept: torch.Tensor) -> None:
        stats.cross += (target.T @ kept).double().cpu()
        stats.output_sq += target.double().square().sum().cpu()

    def _output_hook(self, key: tuple[int, str]):
        def hook(module, args, output):
            if self.tp_rank != 0:
                return
            y = _tokens(output)
            if key[0] in self.bridges and key[1] == "mlp":
                self._pending[key[0], "output"] = y  # its target also needs the dropped block's change
            else:
                self._accumulate(self.stats[key], y, self._pending.pop(key))

        return hook

    def _bridge_start_hook(self, layer: int):
        def hook(module, args, output):
            if self.tp_rank == 0:
                self._pending[layer, "residual"] = _tokens(output)

        return hook

    def _bridge_end_hook(self, layer: int):
        """After the dropped block's last layer: the bridge's target is its MLP output plus what
        the block added to the residual stream (and the target without the bridge, the output alone)."""
        def hook(module, args, output):
            if self.tp_rank == 0:
                change = _tokens(output) - self._pending.pop((layer, "residual"))
                y, kept = self._pending.pop((layer, "output")), self._pending.pop((layer, "mlp"))
                self._accumulate(self.stats[layer, "mlp"], y + change, kept)
                if layer in self.unbridged:
                    self._accumulate(self.unbridged[layer], y, kept)

        return hook

    def __enter__(self) -> "ReconstructionRecorder":
        layers = self.layers
        for (i, consumer) in self.stats:
            if i not in layers:
                continue  # another pipeline stage's
            if consumer == "mamba":
                mixer = layers[i].mixer
                self._mixers_fused[mixer] = mixer.use_mem_eff_path
                mixer.use_mem_eff_path = False  # the unfused path calls the norm as a module
                self._handles += [mixer.norm.register_forward_pre_hook(self._mamba_norm_hook((i, consumer))),
                                  mixer.out_proj.register_forward_hook(self._output_hook((i, consumer)))]
                continue
            module = layers[i].mlp.linear_fc2 if consumer == "mlp" else layers[i].self_attention.linear_proj
            self._handles += [module.register_forward_pre_hook(self._input_hook((i, consumer))),
                              module.register_forward_hook(self._output_hook((i, consumer)))]
        for start, end in self.bridges.items():
            if start in layers:
                self._handles += [layers[start].register_forward_hook(self._bridge_start_hook(start)),
                                  layers[end].register_forward_hook(self._bridge_end_hook(start))]
        return self

    def _within_stages(self, bridges: dict[int, int]) -> dict[int, int]:
        """The bridges whose two ends share a pipeline stage (every rank learns every stage's
        layers, so all decide alike); the others are left out with a warning."""
        stages = [sorted(self.layers)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            stages = [None] * dist.get_world_size()
            dist.all_gather_object(stages, sorted(self.layers))
        kept = {start: end for start, end in bridges.items()
                if any(start in stage and end in stage for stage in stages)}
        for start in sorted(bridges.keys() - kept.keys()):
            log.warning("reconstruct_depth: dropped layers %d..%d end on another pipeline stage than layer %d, whose "
                        "MLP is refit without them", start + 1, bridges[start], start)
        return kept

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for mixer, fused in self._mixers_fused.items():
            mixer.use_mem_eff_path = fused
        self._handles.clear()
        self._pending.clear()
        self._mixers_fused.clear()

    def statistics(self) -> dict[tuple[int, str], Statistics]:
        """Summed over all ranks, the bridged MLPs' `unbridged` statistics too (every rank calls it; PP
        stages contribute their own layers)."""
        for key in sorted(self.stats):
            for tensor in self.stats[key].tensors():
                sum_over_ranks(tensor)
        for layer in sorted(self.unbridged):
            for tensor in (self.unbridged[layer].cross, self.unbridged[layer].output_sq):  # the gram is summed above
                sum_over_ranks(tensor)
        empty = [key for key, stats in self.stats.items() if stats.output_sq == 0]
        if empty:
            raise UserError(f"no calibration data reached layer {empty[0][0]}'s {empty[0][1]}: run forward passes "
                            f"inside the recorder")
        return self.stats


@dataclass
class Reconstruction:
    """What `prune_model` refits with: the teacher's statistics and the ridge, the depth `bridges`
    recorded ({kept layer: the last layer of the dropped run after it}; `statistics` holds their
    bridged targets) and `unbridged`, a bridged MLP's statistics without its bridge where its
    neurons were pruned. `apply` refits with a chosen set of bridges; `errors` holds the calibration
    errors before and after of the last `apply`, `bridge_checks` what `prune_model` decided."""

    statistics: dict[tuple[int, str], Statistics]
    ridge: float
    bridges: dict[int, int] = field(default_factory=dict)
    unbridged: dict[int, Statistics] = field(default_factory=dict)
    errors: dict | None = None
    bridge_checks: list[dict] | None = None

    def with_bridges(self, kept: set[int]) -> dict[tuple[int, str], Statistics]:
        """The statistics to refit with when only the bridges from the layers in `kept` stay: a
        left-out bridge's MLP is refit to its own output, or, with all its neurons kept, not at all."""
        chosen = dict(self.statistics)
        for layer in self.bridges.keys() - kept:
            if layer in self.unbridged:
                chosen[layer, "mlp"] = self.unbridged[layer]
            else:
                del chosen[layer, "mlp"]
        return chosen

    def apply(self, sd: dict[str, torch.Tensor], indices: PruneIndices, arch: ModelArch,
              bridges: set[int] | None = None) -> dict[str, torch.Tensor]:
        """`sd` with the kept consumer columns refit, with the bridges from the layers in `bridges`
        (None: every recorded bridge)."""
        kept = set(self.bridges) if bridges is None else bridges
        refit_sd, self.errors = refit_global(sd, indices, self.with_bridges(kept), arch, self.ridge)
        return refit_sd


def record_statistics(model, indices: PruneIndices, forward_loop, ridge: float,
                      consumers: tuple[str, ...] = tuple(CONSUMERS), bridge: bool = False) -> Reconstruction:
    """Run `forward_loop(model)` on the unpruned model with the recorder on (collective)."""
    with ReconstructionRecorder(model, indices, consumers, bridge) as recorder:
        forward_loop(model)
    return Reconstruction(recorder.statistics(), ridge, dict(recorder.bridges), recorder.unbridged)


def bytes_per_layer(hidden_size: int, kept: int) -> int:
    """Host memory of one consumer's statistics (float64)."""
    return 8 * (kept * kept + hidden_size * kept + 1)
