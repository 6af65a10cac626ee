"""Torch implementations of the Mamba-2 kernels megatron-core's `MambaMixer` calls, for machines
without `mamba_ssm` (CPU, or a GPU image that lacks it).

megatron-core's mixer imports three things from `mamba_ssm` (Triton/CUDA code, which runs only on a
GPU): `mamba_split_conv1d_scan_combined` (the training path), `mamba_chunk_scan_combined` (the
prefill path) and the gated `RMSNorm`; `causal_conv1d_fn` from `causal_conv1d` is optional (the
mixer falls back to its `nn.Conv1d`). From 0.16 it also imports three row-copy helpers of its
dynamic-batching inference written in Triton (`attention_context.triton.tensor_ops`), which fails
where Triton is not installed. `install()` binds the functions below in their place when
`mamba_ssm` (or Triton) is absent and leaves a real installation alone. The scans compute the same
functions in fp32, as the kernels do internally, and return the input dtype.

Why not install the packages on CPU: mamba-ssm 2.3 and causal-conv1d 1.7 build CUDA extensions with
nvcc from source (their prebuilt wheels are CUDA-only); with MAMBA_SKIP_CUDA_BUILD /
CAUSAL_CONV1D_SKIP_CUDA_BUILD they install without them, but then causal-conv1d has no kernel at
all and mamba_ssm's Triton kernels need a GPU to launch.

The layer (Mamba-2, state space duality), per head h of P channels in group g(h) of N states:

    dt_t   = clamp(softplus(dt_raw_t + dt_bias_h), dt_limit)          (a scalar per token and head)
    S_t    = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T                     (S: [P, N], A_h = -exp(A_log_h))
    y_t    = S_t C_t + D_h x_t
    out_t  = RMSNorm_groups(y_t * silu(z_t)) * w                         (norm after the gate)

where x, B, C come out of a depthwise causal conv1d + SiLU over [x; B; C] and z, dt_raw straight
from in_proj. The scan is computed chunk by chunk (`ssd_scan`): inside a chunk as a masked
attention-like product, across chunks through the carried state.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types

import torch
import torch.nn.functional as F


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: entry (i, j) = a[j+1] + ... + a[i] for j <= i (0 on the diagonal),
    -inf above it; exp() of it is the decay from step j to step i of a causal scan."""
    T = a.shape[-1]
    cumsum = torch.cumsum(a, dim=-1)
    sums = cumsum[..., :, None] - cumsum[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, -math.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t, in fp32.

    x [b, l, h, p], dt [b, l, h] (already softplus'd), A [h], B and C [b, l, g, n] with h a multiple
    of g (head i reads group i // (h/g)); initial_state [b, h, p, n] or None (zeros). Returns y
    [b, l, h, p] and the final state [b, h, p, n]. Exact up to rounding for any chunk size."""
    b, length, heads, p = x.shape
    groups, n = B.shape[2], B.shape[3]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(heads // groups, dim=2)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    pad = (-length) % chunk_size
    if pad:  # padded steps have dt = 0: no decay, no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    chunks = x.shape[1] // chunk_size
    x, B, C = (t.reshape(b, chunks, chunk_size, heads, -1) for t in (x, B, C))
    a = (dt * A).reshape(b, chunks, chunk_size, heads).permute(0, 3, 1, 2)      # [b, h, c, T] log-decays
    xdt = x * dt.reshape(b, chunks, chunk_size, heads, 1)                        # dt_t x_t

    # Within each chunk: y_i += sum_{j<=i} (C_i . B_j) exp(a_{j+1..i}) dt_j x_j
    decay = torch.exp(segment_sums(a))                                           # [b, h, c, T, T]
    scores = torch.einsum("bcihn,bcjhn->bhcij", C, B) * decay
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)

    # Each chunk's own contribution to the state at its end: sum_j exp(a_{j+1..T}) dt_j x_j B_j^T
    a_cumsum = torch.cumsum(a, dim=-1)                                           # [b, h, c, T]
    to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)
    chunk_states = torch.einsum("bhcj,bcjhp,bcjhn->bchpn", to_end, xdt, B)
    # Carry the states across chunks: state entering chunk c+1 = exp(sum a over c) * entering c + own c
    state = x.new_zeros(b, heads, p, n) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cumsum[..., -1])                                   # [b, h, c]
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)                                      # [b, c, h, p, n]
    # The entering state's share of every output: C_i exp(a_{1..i}) S_entering
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", C, entering, torch.exp(a_cumsum))
    return y.reshape(b, chunks * chunk_size, heads, p)[:, :length], state


def _time_steps(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                dt_limit: tuple[float, float]) -> torch.Tensor:
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1]) if dt_limit != (0.0, float("inf")) else dt


def _skip(D: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    """D x: D is [h] (a scalar per head) or [h, p]."""
    if D is None:
        return 0.0
    D = D.float()
    return x.float() * (D[:, None] if D.dim() == 1 else D)


def _refuse_packed(seq_idx, cu_seqlens=None) -> None:
    if seq_idx is not None or cu_seqlens is not None:
        raise NotImplementedError("packed sequences (seq_idx / cu_seqlens) in a Mamba layer need mamba_ssm's "
                                  "kernels; the torch implementation scans each sequence of the batch whole")


def chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                        seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                        return_final_states=False, return_varlen_states=False, **unused):
    """`mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`: y = scan + D x, times silu(z)
    when z is given; x [b, l, h, p], dt [b, l, h] raw, B and C [b, l, g, n]."""
    _refuse_packed(seq_idx, cu_seqlens)
    if return_varlen_states:
        raise NotImplementedError("varlen states need mamba_ssm's kernels")
    y, state = ssd_scan(x, _time_steps(dt, dt_bias, dt_softplus, dt_limit), A, B, C, chunk_size, initial_states)
    y = y + _skip(D, x)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, state) if return_final_states else y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str | None = "silu") -> torch.Tensor:
    """Depthwise causal convolution over [b, d, l] with weight [d, w] (then SiLU)."""
    width = weight.shape[-1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"causal conv1d activation {activation!r}: only silu")
    return out


def split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                               seq_idx=None, dt_limit=(0.0, float("inf")), return_final_states=False,
                               activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                               outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True, **unused):
    """`mamba_ssm.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined`: the whole mixer after
    in_proj. zxbcdt [b, l, 2 d + 2 g n + h] is [z; x; B; C; dt]; conv1d over [x; B; C]; the scan;
    then the gate (and, with `rmsnorm_weight`, the gated norm; with `outproj_weight`, out_proj)."""
    _refuse_packed(seq_idx)
    heads = D.shape[0]
    headdim = D.shape[1] if D.dim() == 2 else headdim
    dim = heads * headdim
    state = (zxbcdt.shape[-1] - 2 * dim - heads) // (2 * ngroups)
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * state, heads], dim=-1)
    xBC = causal_conv1d(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * state, ngroups * state], dim=-1)
    b, length = x.shape[:2]
    gate = None if rmsnorm_weight is not None else z.reshape(b, length, heads, headdim)
    y = chunk_scan_combined(x.reshape(b, length, heads, headdim), dt, A, B.reshape(b, length, ngroups, state),
                            C.reshape(b, length, ngroups, state), chunk_size, D=D, z=gate, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=True, dt_limit=dt_limit,
                            return_final_states=return_final_states)
    y, final = y if return_final_states else (y, None)
    y = y.reshape(b, length, dim)
    if rmsnorm_weight is not None:
        y = gated_rms_norm(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None, eps: float, group_size: int,
                   norm_before_gate: bool) -> torch.Tensor:
    """RMSNorm over groups of `group_size` channels, gated by silu(z) after (norm_before_gate) or
    before the norm; in fp32, returned in x's dtype."""
    dtype = x.dtype
    x = x.float()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.float())
    grouped = x.unflatten(-1, (-1, group_size))
    x = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.float()
    if z is not None and norm_before_gate:
        x = x * F.silu(z.float())
    return x.to(dtype)


class GatedRMSNorm(torch.nn.Module):
    """`mamba_ssm.ops.triton.layernorm_gated.RMSNorm`: a [hidden] weight, `forward(x, z=None)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.norm_before_gate = eps, norm_before_gate
        self.group_size = group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


# The module of megatron-core's Triton row-copy helpers, which its Mamba mixer imports.
_TENSOR_OPS = "megatron.core.inference.contexts.attention_context.triton.tensor_ops"


def tensor_get_slice_after(input_tensor, output_tensor, pos_on_device, check_bounds: bool = False) -> None:
    """output[:n] = input[pos:pos + n], n as many rows as both have."""
    pos = int(pos_on_device[0])
    rows = min(input_tensor.shape[0] - pos, output_tensor.shape[0])
    output_tensor[:rows] = input_tensor[pos:pos + rows]


def tensor_merge(tensor_a, tensor_b, pos_on_device, output_tensor=None, check_bounds: bool = False) -> None:
    """output[:pos] = a[:pos] and output[pos:pos + len(b)] = b (output defaults to a, in place)."""
    pos = int(pos_on_device[0])
    out = tensor_a if output_tensor is None else output_tensor
    if out is not tensor_a:
        out[:pos] = tensor_a[:pos]
    rows = min(tensor_b.shape[0], out.shape[0] - pos)
    out[pos:pos + rows] = tensor_b[:rows]


def tensor_masked_update(states, idx, new_states) -> None:
    """states[idx[i]] = new_states[i] for every i with idx[i] != -1."""
    keep = idx != -1
    states[idx[keep].long()] = new_states[keep].to(states.dtype)


def _bind_tensor_ops() -> None:
    """Register the torch row-copy helpers as megatron's Triton module where Triton is absent."""
    if _TENSOR_OPS in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    module = types.ModuleType(_TENSOR_OPS, "torch implementations of megatron-core's Triton row-copy helpers")
    module.tensor_get_slice_after, module.tensor_merge = tensor_get_slice_after, tensor_merge
    module.tensor_masked_update = tensor_masked_update
    sys.modules[_TENSOR_OPS] = module


def mamba_ssm_available() -> bool:
    """Whether megatron-core's mixer found mamba_ssm's kernels (and so needs nothing from here)."""
    from megatron.core.ssm import mamba_mixer

    return bool(mamba_mixer.HAVE_MAMBA_SSM) and torch.cuda.is_available()


def install() -> None:
    """Bind the torch implementations in megatron-core's Mamba modules where `mamba_ssm` (or a GPU
    for it) is missing: the two scans, the gated norm (as megatron's `ExtendedRMSNorm`, which
    shards its weight over TP like the mixer's channels) and the stack's final norm, which megatron
    builds as Transformer Engine's `TENorm` whatever the spec (the torch norm computes the same).
    Idempotent; a machine with mamba_ssm and a GPU keeps the real kernels."""
    _bind_tensor_ops()
    from megatron.core.ssm import mamba_block, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    if not (torch.cuda.is_available() and importlib.util.find_spec("transformer_engine")):
        mamba_block.TENorm = WrappedTorchNorm
    if mamba_ssm_available() or getattr(mamba_mixer, "torch_kernels_installed", False):
        return

    class ExtendedRMSNorm(GatedRMSNorm):
        """The mixer's gated norm, its weight sharded over TP along the channels."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            from megatron.core import parallel_state

            # megatron-core 0.16 takes the groups; 0.15 has no such parameters (it reads parallel_state)
            groups = {"tp_group": parallel_state.get_tensor_model_parallel_group(),
                      "dp_cp_group": (metadata or {}).get("dp_cp_group")}
            accepted = inspect.signature(make_sharded_tensors_for_checkpoint).parameters
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
                **{name: group for name, group in groups.items() if name in accepted})

    mamba_mixer.mamba_split_conv1d_scan_combined = split_conv1d_scan_combined
    mamba_mixer.mamba_chunk_scan_combined = chunk_scan_combined
    mamba_mixer.RMSNormGated = GatedRMSNorm
    mamba_mixer.ExtendedRMSNorm = ExtendedRMSNorm
    mamba_mixer.causal_conv1d_fn = None  # the mixer's own nn.Conv1d path
    mamba_mixer.HAVE_MAMBA_SSM = True
    mamba_mixer.torch_kernels_installed = True

