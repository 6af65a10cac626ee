"""`PruneSpec`: the target architecture, validated against the teacher and the parallel layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import SHAPE_KEYS, ModelArch

# The shape keys a width prune sets (head_dim never changes; depth has its own keys).
_WIDTH_KEYS = tuple(key for key in SHAPE_KEYS if key not in ("num_layers", "kv_channels"))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class PruneSpec:
    """Target sizes; None keeps the teacher's value (head_dim always stays).

    `drop_layers` names the (0-based) layers to drop explicitly; otherwise a depth method picks
    `teacher.num_layers - num_layers` of them. When only `num_query_groups` is set, the heads per
    group stay, so `num_attention_heads` shrinks with the groups.
    """

    num_layers: int | None = None
    drop_layers: list[int] | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    POSITIVE: ClassVar[tuple[str, ...]] = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                           "num_query_groups")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneSpec":
        known = {"num_layers", "drop_layers", *_WIDTH_KEYS}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"unknown target keys {sorted(unknown)}: use target.{{{','.join(sorted(known))}}}")
        drop = data.get("drop_layers")
        return cls(**{k: v for k, v in data.items() if k != "drop_layers"},
                   drop_layers=None if drop is None else [int(i) for i in drop])

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def num_dropped(self, teacher: ModelArch) -> int:
        return teacher.num_layers - self.target_layers(teacher)

    def target_layers(self, teacher: ModelArch) -> int:
        if self.drop_layers is not None:
            return teacher.num_layers - len(self.drop_layers)
        return teacher.num_layers if self.num_layers is None else self.num_layers

    def target_arch(self, teacher: ModelArch, tp: int = 1, pp: int = 1) -> ModelArch:
        """The pruned architecture; ValueError naming the `target.` key when it cannot be built
        from `teacher` or split over tp x pp."""
        self._check_layers(teacher)
        for key in _WIDTH_KEYS:
            value = getattr(self, key)
            if value is not None and not 1 <= value <= getattr(teacher, key):
                raise UserError(f"target.{key}={value} must be between 1 and the teacher's {getattr(teacher, key)}")
        per_group = teacher.num_attention_heads // teacher.num_query_groups
        groups = self.num_query_groups or teacher.num_query_groups
        heads = self.num_attention_heads or (
            teacher.num_attention_heads if self.num_query_groups is None else groups * per_group
        )
        if heads % groups:
            raise UserError(
                f"target.num_attention_heads={heads} is not a multiple of target.num_query_groups={groups}: "
                f"every query group keeps the same number of heads"
            )
        if heads // groups > per_group:
            raise UserError(
                f"target.num_attention_heads={heads} with {groups} query groups needs {heads // groups} heads per "
                f"group, but the teacher's groups have {per_group}: prune heads within groups (at most "
                f"{groups * per_group} heads for {groups} groups) or keep more groups"
            )
        target = teacher.replace(
            num_layers=self.target_layers(teacher),
            hidden_size=self.hidden_size or teacher.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size or teacher.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=groups,
        )
        self._check_parallel(target, tp, pp)
        return target

    def _check_layers(self, teacher: ModelArch) -> None:
        L = teacher.num_layers
        if self.num_layers is not None and not 1 <= self.num_layers <= L:
            raise UserError(f"target.num_layers={self.num_layers} must be between 1 and the teacher's {L}")
        if self.drop_layers is None:
            return
        bad = [i for i in self.drop_layers if not 0 <= i < L]
        if bad:
            raise UserError(f"target.drop_layers has layers {bad} outside 0..{L - 1}")
        if len(set(self.drop_layers)) != len(self.drop_layers):
            raise UserError(f"target.drop_layers={self.drop_layers} lists a layer twice")
        if len(self.drop_layers) >= L:
            raise UserError(f"target.drop_layers drops all {L} layers")
        if self.num_layers is not None and self.num_layers != L - len(self.drop_layers):
            raise UserError(
                f"target.num_layers={self.num_layers} disagrees with target.drop_layers "
                f"({len(self.drop_layers)} of {L} layers dropped leaves {L - len(self.drop_layers)})"
            )

    @staticmethod
    def _check_parallel(target: ModelArch, tp: int, pp: int) -> None:
        if target.num_layers % pp:
            raise UserError(
                f"target.num_layers={target.num_layers} is not divisible by pp={pp}: choose a multiple of {pp} "
                f"or another pp="
            )
        if target.num_query_groups % tp:
            raise UserError(
                f"target.num_query_groups={target.num_query_groups} is not divisible by tp={tp}: choose a multiple "
                f"of {tp} or tp= among {_divisors(target.num_query_groups)}"
            )
        if target.ffn_hidden_size % tp:
            raise UserError(f"target.ffn_hidden_size={target.ffn_hidden_size} is not divisible by tp={tp}")
        target.check_parallel(tp, pp)
