"""The few CUDA-only spots of megatron-core, made to run on CPU.

megatron-core assumes a GPU in a handful of places that have nothing to do with the maths. Every
such spot is covered here, in one place, and only when CUDA is absent. Two spots of the paths taken
without Transformer Engine are covered on any machine: a name only TE defines, and the torch norm's
refusal of sequence parallelism. Each shim names the megatron-core code it covers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types

import torch

_applied = False


class CpuRNGStatesTracker:
    """Drop-in for megatron's `CudaRNGStatesTracker` that keeps named CPU generator states.

    Covers `megatron.core.tensor_parallel.random`: `add` seeds a named state and `fork` runs a block
    under it (used for TP-partitioned weight init and dropout), both via `torch.cuda` RNG calls.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class _TorchWithCpuFactories(types.ModuleType):
    """`torch` as seen by a megatron module, with `device="cuda"` factory tensors made on CPU.

    Covers `megatron.core.pipeline_parallel.schedules` (the token counter
    `torch.zeros([], dtype=torch.int, device="cuda")` in every forward-backward function) and the
    optimizer's scalars: `FP32Optimizer._scale = torch.tensor([1.0], device='cuda')` and the
    mixed-precision optimizer's `found_inf`, `_dummy_overflow_buf` and `_scale_one`
    (`optimizer.optimizer`), `clip_grads.get_grad_norm_fp32`'s `torch.zeros(1, device='cuda')`
    and `utils.local_multi_tensor_l2_norm`'s `torch.tensor([norm], device="cuda")`.
    """

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu_if_cuda(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu_if_cuda(device), **kwargs)


def _cpu_if_cuda(device):
    return "cpu" if device == "cuda" else device


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """`megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32` without its
    `param.grad.type() == 'torch.cuda.FloatTensor'` assertion: the same scaling of every grad by
    max_norm / (total_norm + 1e-6) when that is below 1."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _define_absent_te_gemm() -> None:
    """`megatron.core.transformer.moe.moe_utils` imports `te_general_gemm` from Transformer Engine
    and later tests `te_general_gemm is not None` in the MoE router's gating linear; without TE the
    name is never bound (NameError). Bind it to None, which selects the plain matmul path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _torch_norm_under_sequence_parallelism() -> None:
    """megatron's norm for machines without TE and apex (`megatron.core.transformer.torch_norm.
    WrappedTorchNorm`, the local spec's) asserts `not config.sequence_parallel`, though a torch norm
    computes the same on a sequence shard. What sequence parallelism needs besides is that the
    norm's weight gradients, each from this rank's tokens only, are summed over TP: TE's and apex's
    norms mark their parameters `sequence_parallel` for `finalize_model_grads` to do so. Build the
    torch norm as for no sequence parallelism and mark its parameters the same way."""
    from megatron.core.transformer import torch_norm

    wrapped = torch_norm.WrappedTorchNorm
    if getattr(wrapped.__new__, "marks_sequence_parallel", False):
        return
    build = wrapped.__new__

    def __new__(cls, config, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, *args, **kwargs)
        plain = copy.copy(config)  # a shallow copy: TransformerConfig.__post_init__ does not run again
        plain.sequence_parallel = False
        norm = build(cls, plain, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    __new__.marks_sequence_parallel = True
    wrapped.__new__ = __new__


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, `tensor.type()` names a CPU tensor as its CUDA counterpart
    ("torch.BFloat16Tensor" -> "torch.cuda.BFloat16Tensor"); with arguments it converts as ever."""
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if args or kwargs or self.device.type != "cpu":
            return original(self, *args, **kwargs)
        return original(self).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(init):
    """`Float16OptimizerWithFloat16Params.__init__` (`megatron.core.optimizer.optimizer`) sorts the
    parameters by `param.type()` into bf16/fp16 ones (which get fp32 main copies) and fp32 ones, and
    raises TypeError for any name outside torch.cuda.{Half,BFloat16,Float}Tensor: run it seeing the
    CUDA names. Only that sorting reads the names; the main copies are made with `.float()`."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        with _cuda_type_names():
            init(self, *args, **kwargs)

    return __init__


def apply_cpu_shims() -> None:
    """Patch megatron-core's CUDA-only spots when no GPU is present (and, on any machine, its one name
    that only Transformer Engine defines and its torch norm's refusal of sequence parallelism).
    Idempotent."""
    global _applied
    _define_absent_te_gemm()
    _torch_norm_under_sequence_parallelism()
    if _applied or torch.cuda.is_available():
        return
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random

    # Rotary embedding (`RotaryEmbedding.__init__/forward`), parallel layers' weight allocation,
    # p2p shape exchange and many others place tensors on `torch.cuda.current_device()`.
    torch.cuda.current_device = lambda: "cpu"
    # p2p_communication and the schedules synchronise the stream around sends and receives.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    for module in (schedules, mcore_optimizer, clip_grads, grad_scaler, mcore_utils):
        module.torch = _TorchWithCpuFactories()
    # The optimizer's gradient clipping asserts CUDA grads (`clip_grad_by_total_norm_fp32`).
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    # The bf16/fp16 optimizer accepts only CUDA parameter type names.
    mixed = mcore_optimizer.Float16OptimizerWithFloat16Params
    mixed.__init__ = _with_cuda_type_names(mixed.__init__)
    # `LanguageModule.setup_embeddings_and_output_layer` moves the tied embedding to the GPU with
    # `weight.data.cuda()` before the first/last-stage all-reduce (PP > 1, tied embeddings).
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _applied = True
