"""Dense -> mixture of experts, exactly: every MLP split into experts that together compute it.

`split_into_experts(arch, global_sd, num_experts)` gives layer l's FFN neurons [0, F) to E experts
of F/E consecutive neurons each (expert e: neurons [e F/E, (e + 1) F/E), i.e. those rows of the
gate and of the up projection and those columns of the down projection), with a zero router and
top-k = E. Every token then goes to every expert with weight softmax(0) = 1/E, and each expert's
down projection is multiplied by E, so the layer computes

    sum_e (1/E) * (E * W_down[:, e]) act(W_gate[e] x) * (W_up[e] x) = W_down act(W_gate x) * (W_up x),

the dense MLP. Llama and Mistral become Mixtral (the same attention); Qwen3 becomes Qwen3-MoE (both
have per-head query/key norms). Qwen2 has no MoE family without a shared expert and is refused.

This makes a real pretrained MoE out of any dense checkpoint: the embedded SmolLM2 tests and
benchmarks the MoE code on real text, and it is the exact starting point of sparse upcycling
(train the router and the experts from there).
"""

from __future__ import annotations

import torch

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import ModelArch

# dense family -> the MoE family with the same attention and no shared expert
_MOE_FAMILY = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe"}


def expert_arch(arch: ModelArch, num_experts: int) -> ModelArch:
    """The MoE architecture `split_into_experts` makes of the dense `arch`."""
    if arch.family not in _MOE_FAMILY:
        raise UserError(f"{arch.family} models cannot be split into experts exactly (supported: "
                        f"{sorted(_MOE_FAMILY)}, which become {sorted(set(_MOE_FAMILY.values()))})")
    if num_experts < 1 or arch.ffn_hidden_size % num_experts:
        raise UserError(f"num_experts={num_experts} does not divide ffn_hidden_size={arch.ffn_hidden_size}")
    width = arch.ffn_hidden_size // num_experts
    family = _MOE_FAMILY[arch.family]
    return arch.replace(family=family, num_moe_experts=num_experts, moe_router_topk=num_experts,
                        moe_ffn_hidden_size=width,
                        ffn_hidden_size=width if family == "mixtral" else arch.ffn_hidden_size)


@torch.no_grad()
def split_into_experts(arch: ModelArch, global_sd: dict[str, torch.Tensor],
                       num_experts: int) -> tuple[ModelArch, dict[str, torch.Tensor]]:
    """(MoE architecture, its global state dict) computing exactly what the dense model does."""
    moe = expert_arch(arch, num_experts)
    width = moe.moe_ffn_hidden_size
    out = {}
    for name, tensor in global_sd.items():
        if ".mlp.linear_fc" not in name:
            out[name] = tensor
            continue
        prefix = name[: name.index("mlp.") + len("mlp.")]
        if name.endswith("linear_fc1.weight"):
            gate, up = tensor.chunk(2)
            for e in range(num_experts):
                rows = slice(e * width, (e + 1) * width)
                out[f"{prefix}experts.local_experts.{e}.linear_fc1.weight"] = torch.cat([gate[rows], up[rows]])
            out[prefix + "router.weight"] = torch.zeros(num_experts, arch.hidden_size, dtype=tensor.dtype)
        else:
            for e in range(num_experts):
                columns = tensor[:, e * width:(e + 1) * width]
                out[f"{prefix}experts.local_experts.{e}.linear_fc2.weight"] = columns * num_experts
    return moe, out
