"""Candidate architectures on hardware-friendly grids, filtered by a parameter or memory budget.

Axes: depth, hidden size, (attention heads, query groups) pairs and the MLP width. A dense teacher's
MLP width is `ffn_hidden_size`; a mixture-of-experts teacher's is three axes instead (its layers do
not use `ffn_hidden_size`): the number of routed experts, every expert's FFN width and, where it has
one, the shared expert's FFN width (`MOE_SHAPE_KEYS`). A hybrid (Mamba) teacher adds its Mamba
layers' heads and channels per head (`MAMBA_SHAPE_KEYS`) and keeps its depth: a hybrid's depth
is pruned per layer kind (`PruneSpec.num_<kind>_layers`), three axes the grid leaves to the prune
stage. A candidate is the prune stage's target
(`target_of`), built by `PruneSpec.target_arch`, so the search proposes nothing the prune stage
would refuse."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import MAMBA_CONV_KERNEL, MAMBA_SHAPE_KEYS, MOE_SHAPE_KEYS, SHAPE_KEYS, ModelArch
from nemo_minitron.pruning import PruneSpec

# Every shape key but the head dimension, which pruning never changes; MoE teachers swap
# ffn_hidden_size for the MoE keys they have (`axes`).
AXES = tuple(key for key in SHAPE_KEYS if key != "kv_channels")
_KINDS = ("params", "non_embedding_params", "active_params", "memory_bytes")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass
class Budget:
    """What a candidate may cost: exactly one of `params` (total), `non_embedding_params`,
    `active_params` (the parameters one token runs through: an MoE model's top-k routed experts, a
    dense model's total) or `memory_bytes`, met within +-`tolerance` (a fraction of the budget).

    Inference memory = weights (total parameters x bytes of `memory_dtype`) + the KV cache of
    `memory_batch_size` x `memory_seq_length` tokens: 2 (K and V) x attention layers x query groups
    x head_dim values per token, at the same dtype. A hybrid's Mamba layers hold instead a state per
    sequence whatever its length: the SSM state (heads x head_dim x state_dim, in float32 as
    transformers' and vLLM's NemotronH keep it) and the convolution's last 3 inputs (conv channels x
    3, at `memory_dtype`). Activations and workspace are left out: they depend on the kernels, not
    on the architecture.
    """

    params: float | None = None   # total parameters (tied embeddings once)
    non_embedding_params: float | None = None   # parameters outside the embedding and output layers
    # parameters one token runs through (MoE: the router's top-k experts; dense: params)
    active_params: float | None = None
    memory_bytes: float | None = None   # weights + KV cache at memory_dtype for memory_batch_size x memory_seq_length
    tolerance: float = 0.05   # keep candidates whose cost is within +-5% of the budget
    memory_dtype: str = "bfloat16"   # float32 | bfloat16 | float16 | fp8 | int8 | int4
    memory_batch_size: int = 1   # sequences in the KV cache of the memory budget
    memory_seq_length: int = 4096   # tokens per sequence in the KV cache of the memory budget
    POSITIVE: ClassVar[tuple[str, ...]] = ("memory_batch_size", "memory_seq_length")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("tolerance",)

    def validate(self) -> None:
        """Raise UserError naming the budget key to fix (a config may carry an unset budget until a
        search runs with it)."""
        given = [k for k in _KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError(f"set exactly one of {', '.join(f'budget.{k}' for k in _KINDS)} (got {given or 'none'})")
        if getattr(self, given[0]) <= 0:
            raise UserError(f"budget.{given[0]}={getattr(self, given[0])} must be positive")
        if not 0 <= self.tolerance < 1:
            raise UserError(f"budget.tolerance={self.tolerance} must be in [0, 1)")
        if self.memory_dtype not in _DTYPE_BYTES:
            raise UserError(f"budget.memory_dtype={self.memory_dtype} is not one of {list(_DTYPE_BYTES)}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def memory(self, arch: ModelArch) -> float:
        """Inference memory of `arch` in bytes (see the class docstring)."""
        width = _DTYPE_BYTES[self.memory_dtype]
        kv = 2 * len(arch.layers_with("attention")) * arch.num_query_groups * arch.kv_channels
        weights_and_kv = width * (arch.num_parameters()["total"] + kv * self.memory_batch_size * self.memory_seq_length)
        if not arch.is_hybrid:
            return weights_and_kv
        ssm = 4 * arch.mamba_inner * arch.mamba_state_dim
        conv = width * sum(arch.mamba_conv_blocks.values()) * (MAMBA_CONV_KERNEL - 1)
        return weights_and_kv + len(arch.layers_with("mamba")) * (ssm + conv) * self.memory_batch_size

    def cost(self, arch: ModelArch) -> float:
        if self.kind == "memory_bytes":
            return self.memory(arch)
        counts = arch.num_parameters()
        if self.kind == "active_params":
            return float(counts.get("active", counts["total"]))
        return float(counts["total" if self.kind == "params" else "non_embedding"])

    def admits(self, arch: ModelArch) -> bool:
        return abs(self.cost(arch) - self.value) <= self.tolerance * self.value


@dataclass
class SearchSpace:
    """Per-axis grids: multiples of the `*_multiple` keys between `min_fraction` of the teacher's
    value and the teacher's value (which is always allowed). Attention keeps whole query groups
    (a multiple of tp) with 1..teacher heads per group, so heads are a multiple of the groups.
    Routed experts stay at least the router's top-k and a multiple of ep. `choices` replaces an
    axis's grid by an explicit list."""

    layer_multiple: int = 1   # grid steps; the teacher's own value is always on the grid
    hidden_multiple: int = 256   # hidden_size grid step
    ffn_multiple: int = 512   # ffn_hidden_size grid step
    expert_multiple: int = 8      # num_moe_experts grid step (MoE teachers; also a multiple of ep, at least the top-k)
    moe_ffn_multiple: int = 128   # moe_ffn_hidden_size and moe_shared_expert_intermediate_size grid step (MoE teachers)
    mamba_head_dim_multiple: int = 16   # mamba_head_dim grid step (hybrid teachers; mamba_num_heads steps by the SSM groups)
    min_fraction: float = 0.5   # no axis below this fraction of the teacher
    # explicit values replace an axis's grid, e.g. choices.num_layers=[16,32]; the axes: num_layers, hidden_size,
    # ffn_hidden_size, num_attention_heads (null: 1 to the teacher's heads per group, times the groups),
    # num_query_groups (null: multiples of tp), for MoE teachers num_moe_experts, moe_ffn_hidden_size,
    # moe_shared_expert_intermediate_size, for hybrid teachers mamba_num_heads, mamba_head_dim
    choices: dict[str, list[int] | None] = field(
        default_factory=lambda: dict.fromkeys((*AXES, *MOE_SHAPE_KEYS, *MAMBA_SHAPE_KEYS)))
    POSITIVE: ClassVar[tuple[str, ...]] = ("layer_multiple", "hidden_multiple", "ffn_multiple", "expert_multiple",
                                           "moe_ffn_multiple", "mamba_head_dim_multiple")

    def __post_init__(self):
        if not 0 < self.min_fraction <= 1:
            raise UserError(f"search.space.min_fraction={self.min_fraction} must be in (0, 1]")
        known = [*AXES, *MOE_SHAPE_KEYS, *MAMBA_SHAPE_KEYS]
        unknown = {k for k, v in self.choices.items() if v is not None} - set(known)
        if unknown:
            raise UserError(f"unknown search.space.choices keys {sorted(unknown)}: use {known}")

    def _grid(self, teacher_value: int, multiple: int) -> list[int]:
        low = max(1, int(self.min_fraction * teacher_value + 0.999999))
        start = -(-low // multiple) * multiple
        return sorted(set(range(start, teacher_value + 1, multiple)) | {teacher_value})

    def axis(self, name: str, teacher: ModelArch) -> list[int]:
        explicit = self.choices.get(name)
        if explicit is not None:
            return sorted(set(int(v) for v in explicit))
        if name == "num_layers" and teacher.is_hybrid:  # a hybrid's depth goes per kind (module docstring)
            return [teacher.num_layers]
        multiple = {"num_layers": self.layer_multiple, "hidden_size": self.hidden_multiple,
                    "ffn_hidden_size": self.ffn_multiple, "num_moe_experts": self.expert_multiple,
                    "moe_ffn_hidden_size": self.moe_ffn_multiple,
                    "moe_shared_expert_intermediate_size": self.moe_ffn_multiple,
                    # heads leave within their SSM groups, as many from each
                    "mamba_num_heads": teacher.mamba_num_groups, "mamba_head_dim": self.mamba_head_dim_multiple}[name]
        return self._grid(getattr(teacher, name), multiple)

    def attention(self, teacher: ModelArch, tp: int) -> list[tuple[int, int]]:
        """(heads, groups) pairs."""
        per_group = teacher.num_attention_heads // teacher.num_query_groups
        groups = self.choices.get("num_query_groups") or range(tp, teacher.num_query_groups + 1, tp)
        heads = self.choices.get("num_attention_heads")
        pairs = [(g * k, g) for g in groups for k in range(1, per_group + 1)]
        return sorted(p for p in pairs if heads is None or p[0] in heads)


def mlp_axes(arch: ModelArch) -> tuple[str, ...]:
    """The MLP width axes: ffn_hidden_size, or the MoE shape keys the model has."""
    if not arch.is_moe:
        return ("ffn_hidden_size",)
    return tuple(key for key in MOE_SHAPE_KEYS if getattr(arch, key) is not None)


def axes(arch: ModelArch) -> tuple[str, ...]:
    """The searched keys of `arch`, i.e. the prune target's."""
    return (*(key for key in AXES if key != "ffn_hidden_size"), *mlp_axes(arch),
            *(MAMBA_SHAPE_KEYS if arch.is_hybrid else ()))


# A candidate name's letter per key, in the name's order.
_NAME_LETTERS = {"num_layers": "L", "hidden_size": "H", "ffn_hidden_size": "F", "num_attention_heads": "A",
                 "num_query_groups": "G", "num_moe_experts": "E", "moe_ffn_hidden_size": "M",
                 "moe_shared_expert_intermediate_size": "S", "mamba_num_heads": "N", "mamba_head_dim": "P"}


def candidate_name(arch: ModelArch) -> str:
    """e.g. L32-H3072-F9216-A32-G8; an MoE model's FFN is its experts: L48-H2048-A32-G4-E96-M768; a
    hybrid adds its Mamba heads and head channels: L62-H4480-F15680-A40-G8-N128-P80."""
    keys = axes(arch)
    return "-".join(f"{letter}{getattr(arch, key)}" for key, letter in _NAME_LETTERS.items() if key in keys)


def target_of(arch: ModelArch) -> dict[str, Any]:
    """The prune stage's `target` block for `arch`."""
    return {key: getattr(arch, key) for key in axes(arch)}


def enumerate_candidates(
    teacher: ModelArch, space: SearchSpace, budget: Budget, tp: int = 1, pp: int = 1, ep: int = 1
) -> list[ModelArch]:
    """Every grid architecture prunable from `teacher`, splittable over tp x pp (x ep) and within the
    budget, largest first (closed-form counts: no weights are touched)."""
    widths = mlp_axes(teacher) + (MAMBA_SHAPE_KEYS if teacher.is_hybrid else ())
    # Divisibility the layout needs, filtered before the product; the prune stage checks the rest.
    divisor = {"ffn_hidden_size": tp, "moe_ffn_hidden_size": tp, "moe_shared_expert_intermediate_size": tp,
               "num_moe_experts": ep, "mamba_num_heads": tp, "mamba_head_dim": 1}
    floor = {"num_moe_experts": teacher.moe_router_topk or 1}
    found = []
    for layers, hidden, (heads, groups), *sizes in itertools.product(
        [n for n in space.axis("num_layers", teacher) if n % pp == 0],
        space.axis("hidden_size", teacher),
        space.attention(teacher, tp),
        *[[v for v in space.axis(key, teacher) if v % divisor[key] == 0 and v >= floor.get(key, 1)]
          for key in widths],
    ):
        arch = teacher.replace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                               num_query_groups=groups, **dict(zip(widths, sizes)))
        if not budget.admits(arch):
            continue
        try:  # the pruning stage's own rules (sizes within the teacher's, divisibility) and its arch
            found.append(PruneSpec.from_dict(target_of(arch)).target_arch(teacher, tp, pp, ep))
        except ValueError:
            continue
    return sorted(found, key=lambda a: (-budget.cost(a), candidate_name(a)))


def spread(candidates: list[ModelArch], limit: int) -> list[ModelArch]:
    """At most `limit` candidates evenly spaced over the list (so over the budget window)."""
    if limit <= 0 or len(candidates) <= limit:
        return list(candidates)
    if limit == 1:
        return [candidates[0]]
    step = (len(candidates) - 1) / (limit - 1)
    return [candidates[round(i * step)] for i in range(limit)]
