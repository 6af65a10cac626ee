"""Candidate architectures on hardware-friendly grids, filtered by a parameter or memory budget."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import SHAPE_KEYS, ModelArch
from nemo_minitron.prune import PruneSpec

# Every shape key but the head dimension, which pruning never changes.
AXES = tuple(key for key in SHAPE_KEYS if key != "kv_channels")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


@dataclass
class Budget:
    """What a candidate may cost: exactly one of `params` (total), `non_embedding_params` or
    `memory_bytes`, met within +-`tolerance` (a fraction of the budget).

    Inference memory = weights (total parameters x bytes of `memory_dtype`) + the KV cache of
    `memory_batch_size` x `memory_seq_length` tokens: 2 (K and V) x layers x query groups x head_dim
    values per token, at the same dtype. Activations and workspace are left out: they depend on the
    kernels, not on the architecture.
    """

    params: float | None = None
    non_embedding_params: float | None = None
    memory_bytes: float | None = None
    tolerance: float = 0.05
    memory_dtype: str = "bfloat16"
    memory_batch_size: int = 1
    memory_seq_length: int = 4096
    POSITIVE: ClassVar[tuple[str, ...]] = ("memory_batch_size", "memory_seq_length")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("tolerance",)

    def validate(self) -> None:
        """Raise UserError naming the budget key to fix (a config may carry an unset budget until a
        search runs with it)."""
        given = [k for k in ("params", "non_embedding_params", "memory_bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise UserError(f"set exactly one of budget.params, budget.non_embedding_params, budget.memory_bytes "
                             f"(got {given or 'none'})")
        if getattr(self, given[0]) <= 0:
            raise UserError(f"budget.{given[0]}={getattr(self, given[0])} must be positive")
        if not 0 <= self.tolerance < 1:
            raise UserError(f"budget.tolerance={self.tolerance} must be in [0, 1)")
        if self.memory_dtype not in _DTYPE_BYTES:
            raise UserError(f"budget.memory_dtype={self.memory_dtype} is not one of {list(_DTYPE_BYTES)}")

    @property
    def kind(self) -> str:
        return next(k for k in ("params", "non_embedding_params", "memory_bytes") if getattr(self, k) is not None)

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))

    def memory(self, arch: ModelArch) -> float:
        """Inference memory of `arch` in bytes (see the class docstring)."""
        width = _DTYPE_BYTES[self.memory_dtype]
        kv = 2 * arch.num_layers * arch.num_query_groups * arch.kv_channels
        return width * (arch.num_parameters()["total"] + kv * self.memory_batch_size * self.memory_seq_length)

    def cost(self, arch: ModelArch) -> float:
        if self.kind == "memory_bytes":
            return self.memory(arch)
        return float(arch.num_parameters()["total" if self.kind == "params" else "non_embedding"])

    def admits(self, arch: ModelArch) -> bool:
        return abs(self.cost(arch) - self.value) <= self.tolerance * self.value


@dataclass
class SearchSpace:
    """Per-axis grids: multiples of the `*_multiple` keys between `min_fraction` of the teacher's
    value and the teacher's value (which is always allowed). Attention keeps whole query groups
    (a multiple of tp) with 1..teacher heads per group, so heads are a multiple of the groups.
    `choices` replaces an axis's grid by an explicit list."""

    layer_multiple: int = 1
    hidden_multiple: int = 256
    ffn_multiple: int = 512
    min_fraction: float = 0.5
    choices: dict[str, list[int] | None] = field(default_factory=dict)
    POSITIVE: ClassVar[tuple[str, ...]] = ("layer_multiple", "hidden_multiple", "ffn_multiple")

    def __post_init__(self):
        if not 0 < self.min_fraction <= 1:
            raise UserError(f"search.space.min_fraction={self.min_fraction} must be in (0, 1]")
        unknown = {k for k, v in self.choices.items() if v is not None} - set(AXES)
        if unknown:
            raise UserError(f"unknown search.space.choices keys {sorted(unknown)}: use {list(AXES)}")

    def _grid(self, teacher_value: int, multiple: int) -> list[int]:
        low = max(1, int(self.min_fraction * teacher_value + 0.999999))
        start = -(-low // multiple) * multiple
        return sorted(set(range(start, teacher_value + 1, multiple)) | {teacher_value})

    def axis(self, name: str, teacher: ModelArch) -> list[int]:
        explicit = self.choices.get(name)
        if explicit is not None:
            return sorted(set(int(v) for v in explicit))
        multiple = {"num_layers": self.layer_multiple, "hidden_size": self.hidden_multiple,
                    "ffn_hidden_size": self.ffn_multiple}[name]
        return self._grid(getattr(teacher, name), multiple)

    def attention(self, teacher: ModelArch, tp: int) -> list[tuple[int, int]]:
        """(heads, groups) pairs."""
        per_group = teacher.num_attention_heads // teacher.num_query_groups
        groups = self.choices.get("num_query_groups") or range(tp, teacher.num_query_groups + 1, tp)
        heads = self.choices.get("num_attention_heads")
        pairs = [(g * k, g) for g in groups for k in range(1, per_group + 1)]
        return sorted(p for p in pairs if heads is None or p[0] in heads)


def candidate_name(arch: ModelArch) -> str:
    return (f"L{arch.num_layers}-H{arch.hidden_size}-F{arch.ffn_hidden_size}"
            f"-A{arch.num_attention_heads}-G{arch.num_query_groups}")


def target_of(arch: ModelArch) -> dict[str, Any]:
    """The prune stage's `target` block for `arch`."""
    return {key: getattr(arch, key) for key in AXES}


def enumerate_candidates(
    teacher: ModelArch, space: SearchSpace, budget: Budget, tp: int = 1, pp: int = 1
) -> list[ModelArch]:
    """Every grid architecture prunable from `teacher`, splittable over tp x pp and within the
    budget, largest first (closed-form counts: no weights are touched)."""
    found = []
    for layers, hidden, ffn, (heads, groups) in itertools.product(
        [n for n in space.axis("num_layers", teacher) if n % pp == 0],
        space.axis("hidden_size", teacher),
        [f for f in space.axis("ffn_hidden_size", teacher) if f % tp == 0],
        space.attention(teacher, tp),
    ):
        arch = teacher.replace(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                               num_attention_heads=heads, num_query_groups=groups)
        if not budget.admits(arch):
            continue
        try:  # the pruning stage's own rules (sizes within the teacher's, divisibility)
            PruneSpec.from_dict(target_of(arch)).target_arch(teacher, tp, pp)
        except ValueError:
            continue
        found.append(arch)
    return sorted(found, key=lambda a: (-budget.cost(a), candidate_name(a)))


def spread(candidates: list[ModelArch], limit: int) -> list[ModelArch]:
    """At most `limit` candidates evenly spaced over the list (so over the budget window)."""
    if limit <= 0 or len(candidates) <= limit:
        return list(candidates)
    if limit == 1:
        return [candidates[0]]
    step = (len(candidates) - 1) / (limit - 1)
    return [candidates[round(i * step)] for i in range(limit)]
