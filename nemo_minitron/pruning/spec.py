"""`PruneSpec`: the target architecture, validated against the teacher and the parallel layout."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

from nemo_minitron.errors import UserError
from nemo_minitron.models.config import LAYER_SYMBOLS, MAMBA_SHAPE_KEYS, MOE_SHAPE_KEYS, SHAPE_KEYS, ModelArch

# The shape keys a width prune sets (head_dim never changes; depth has its own keys).
_WIDTH_KEYS = tuple(key for key in SHAPE_KEYS if key not in ("num_layers", "kv_channels"))
# A hybrid's depth per layer kind: the target key of each kind of its pattern.
KIND_KEYS = {kind: f"num_{kind}_layers" for kind in LAYER_SYMBOLS.values()}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _last_of_each_kind(teacher: ModelArch, per_kind: dict[str, int]) -> list[int]:
    """The last `per_kind[kind]` layers of every kind: a provisional choice with the right counts."""
    return [i for kind, n in per_kind.items() if n for i in teacher.layers_with(kind)[-n:]]


@dataclass
class PruneSpec:
    """Target sizes; None keeps the teacher's value (head_dim always stays).

    `drop_layers` names the (0-based) layers to drop explicitly; otherwise a depth method picks
    `teacher.num_layers - num_layers` of them. When only `num_query_groups` is set, the heads per
    group stay, so `num_attention_heads` shrinks with the groups. A mixture-of-experts teacher
    prunes its routed experts (`num_moe_experts`, at least the router's top-k, which
    `moe_router_topk` may lower), every expert's FFN (`moe_ffn_hidden_size`) and the shared
    expert's (`moe_shared_expert_intermediate_size`) instead of `ffn_hidden_size`, which its layers
    do not use. A hybrid (Mamba) teacher also prunes its Mamba layers' heads (`mamba_num_heads`,
    group-aware: every SSM group keeps as many of its own heads, so a multiple of the groups) and
    channels per head (`mamba_head_dim`). Its depth goes per layer kind: `num_mamba_layers`,
    `num_attention_layers` and `num_mlp_layers` keep that many layers of the kind (a depth method
    picks which, each kind ranked apart), or `drop_layers` names them; the layers that go decide
    the student's pattern, and their kinds its size.
    """

    num_layers: int | None = None   # layers to keep (depth pruning, layers chosen by depth.method)
    drop_layers: list[int] | None = None   # explicit 0-based layers to drop (instead of depth.method)
    hidden_size: int | None = None   # embedding channels to keep (width pruning)
    ffn_hidden_size: int | None = None   # MLP neurons per layer to keep (width pruning)
    num_attention_heads: int | None = None   # null with num_query_groups set: keep the heads per group
    num_query_groups: int | None = None   # fewer groups prunes whole query groups
    num_moe_experts: int | None = None   # MoE teachers: routed experts per layer to keep (at least the router's top-k)
    # MoE teachers: neurons to keep in every routed expert (instead of ffn_hidden_size)
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None   # MoE teachers with a shared expert: its neurons to keep
    # MoE teachers: experts per token (at most the teacher's; needed when fewer experts remain)
    moe_router_topk: int | None = None
    mamba_num_heads: int | None = None   # hybrid teachers: SSM heads per Mamba layer to keep (a multiple of the groups)
    mamba_head_dim: int | None = None   # hybrid teachers: channels to keep in every SSM head
    num_mamba_layers: int | None = None   # hybrid teachers: Mamba layers to keep (depth.method picks which)
    num_attention_layers: int | None = None   # hybrid teachers: attention layers to keep (depth.method picks which)
    num_mlp_layers: int | None = None   # hybrid teachers: MLP layers to keep (depth.method picks which)
    POSITIVE: ClassVar[tuple[str, ...]] = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                           "num_query_groups", *MOE_SHAPE_KEYS, "moe_router_topk", *MAMBA_SHAPE_KEYS,
                                           *KIND_KEYS.values())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneSpec":
        known = {"num_layers", "drop_layers", *_WIDTH_KEYS, *MOE_SHAPE_KEYS, "moe_router_topk", *MAMBA_SHAPE_KEYS,
                 *KIND_KEYS.values()}
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
        per_kind = self.dropped_per_kind(teacher)
        if per_kind is not None:
            return teacher.num_layers - sum(per_kind.values())
        return teacher.num_layers if self.num_layers is None else self.num_layers

    def dropped_per_kind(self, teacher: ModelArch) -> dict[str, int] | None:
        """How many layers of each kind a hybrid target drops, when its `num_<kind>_layers` keys
        say so (a kind left unset keeps all its layers); None without those keys."""
        if all(getattr(self, key) is None for key in KIND_KEYS.values()):
            return None
        counts = Counter(teacher.layer_types)
        return {kind: counts[kind] - getattr(self, key) for kind, key in KIND_KEYS.items()
                if getattr(self, key) is not None}

    def with_dropped(self, dropped: list[int]) -> "PruneSpec":
        """This target with the layers a depth method chose named: its hybrid pattern is then the
        student's (checked against the per-kind counts by `target_arch`)."""
        return replace(self, drop_layers=sorted(dropped))

    def target_arch(self, teacher: ModelArch, tp: int = 1, pp: int = 1, ep: int = 1) -> ModelArch:
        """The pruned architecture; ValueError naming the `target.` key when it cannot be built
        from `teacher` or split over tp x pp.

        A hybrid target whose layers a depth method will choose (`num_<kind>_layers` without
        `drop_layers`) gets a provisional pattern, each kind's last layers dropped: its sizes and
        parameter counts are the student's (every layer of a kind has the same shape), its order
        is known once `with_dropped` names the chosen layers."""
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
        moe = self._moe_sizes(teacher)
        target = teacher.replace(
            **self._mamba_sizes(teacher),
            num_layers=self.target_layers(teacher),
            hidden_size=self.hidden_size or teacher.hidden_size,
            ffn_hidden_size=moe.pop("ffn_hidden_size", self.ffn_hidden_size or teacher.ffn_hidden_size),
            num_attention_heads=heads,
            num_query_groups=groups,
            **moe,
        )
        self._check_parallel(target, tp, pp, ep)
        return target

    def _moe_sizes(self, teacher: ModelArch) -> dict[str, int]:
        """The MoE shape keys of the target (none for a dense teacher, which may not set them)."""
        set_keys = [key for key in (*MOE_SHAPE_KEYS, "moe_router_topk") if getattr(self, key) is not None]
        if not teacher.is_moe:
            if set_keys:
                raise UserError(f"target.{set_keys[0]} is set but the teacher ({teacher.family}) has no "
                                f"mixture-of-experts layers")
            return {}
        if self.ffn_hidden_size is not None:
            raise UserError("target.ffn_hidden_size is not used by the teacher's mixture-of-experts layers: set "
                            "target.moe_ffn_hidden_size (every routed expert) or "
                            "target.moe_shared_expert_intermediate_size")
        sizes = {}
        for key in MOE_SHAPE_KEYS:
            value, full = getattr(self, key), getattr(teacher, key)
            if value is not None and full is None:
                raise UserError(f"target.{key} is set but the teacher ({teacher.family}) has no shared expert")
            if value is not None and not 1 <= value <= full:
                raise UserError(f"target.{key}={value} must be between 1 and the teacher's {full}")
            sizes[key] = value or full
        topk = self.moe_router_topk or teacher.moe_router_topk
        if not 1 <= topk <= teacher.moe_router_topk:
            raise UserError(f"target.moe_router_topk={topk} must be between 1 and the teacher's {teacher.moe_router_topk}")
        if sizes["num_moe_experts"] < topk:
            raise UserError(f"target.num_moe_experts={sizes['num_moe_experts']} is below the router's top-k "
                            f"({topk}): keep at least that many experts, or lower target.moe_router_topk")
        sizes["moe_router_topk"] = topk
        if teacher.family == "mixtral":  # its one intermediate_size is the experts'
            sizes["ffn_hidden_size"] = sizes["moe_ffn_hidden_size"]
        return sizes

    def _mamba_sizes(self, teacher: ModelArch) -> dict:
        """A hybrid target's Mamba shape keys and layer pattern (none for a teacher without Mamba
        layers, which may not set them)."""
        set_keys = [key for key in MAMBA_SHAPE_KEYS if getattr(self, key) is not None]
        if not teacher.is_hybrid:
            if set_keys:
                raise UserError(f"target.{set_keys[0]} is set but the teacher ({teacher.family}) has no Mamba layers")
            return {}
        sizes = {}
        for key in MAMBA_SHAPE_KEYS:
            value, full = getattr(self, key), getattr(teacher, key)
            if value is not None and not 1 <= value <= full:
                raise UserError(f"target.{key}={value} must be between 1 and the teacher's {full}")
            sizes[key] = value or full
        groups = teacher.mamba_num_groups
        if sizes["mamba_num_heads"] % groups:
            raise UserError(f"target.mamba_num_heads={sizes['mamba_num_heads']} is not a multiple of the teacher's "
                            f"{groups} SSM groups: heads leave within their groups, each group keeping as many "
                            f"(choose among {[groups * k for k in range(1, teacher.mamba_num_heads // groups + 1)]})")
        per_kind = self.dropped_per_kind(teacher)
        if self.num_dropped(teacher) and self.drop_layers is None and per_kind is None:
            raise UserError(f"target.num_layers={self.num_layers} on a hybrid teacher: say how many layers of each "
                            f"kind stay with target.{{{','.join(KIND_KEYS.values())}}} (depth.method picks which), or "
                            f"name the layers with target.drop_layers (which kinds go, of the pattern "
                            f"{teacher.hybrid_pattern!r}, decides the student's size)")
        dropped = set(self.drop_layers if self.drop_layers is not None else _last_of_each_kind(teacher, per_kind or {}))
        sizes["hybrid_pattern"] = "".join(s for i, s in enumerate(teacher.hybrid_pattern) if i not in dropped)
        return sizes

    def _check_layers(self, teacher: ModelArch) -> None:
        L = teacher.num_layers
        if self.num_layers is not None and not 1 <= self.num_layers <= L:
            raise UserError(f"target.num_layers={self.num_layers} must be between 1 and the teacher's {L}")
        self._check_kinds(teacher)
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

    def _check_kinds(self, teacher: ModelArch) -> None:
        """The per-kind depth keys: a hybrid's, within its counts, agreeing with num_layers and drop_layers."""
        set_keys = {kind: getattr(self, key) for kind, key in KIND_KEYS.items() if getattr(self, key) is not None}
        if not set_keys:
            return
        if not teacher.is_hybrid:
            raise UserError(f"target.{KIND_KEYS[next(iter(set_keys))]} is set but the teacher ({teacher.family}) has "
                            f"no layer pattern: use target.num_layers")
        counts = Counter(teacher.layer_types)
        for kind, keep in set_keys.items():
            if not 1 <= keep <= counts[kind]:
                raise UserError(f"target.{KIND_KEYS[kind]}={keep} must be between 1 and the teacher's {counts[kind]} "
                                f"{kind} layers (pattern {teacher.hybrid_pattern!r})")
        kept = teacher.num_layers - sum(self.dropped_per_kind(teacher).values())
        if self.num_layers is not None and self.num_layers != kept:
            raise UserError(f"target.num_layers={self.num_layers} disagrees with the layers kept per kind "
                            f"({', '.join(f'{KIND_KEYS[k]}={v}' for k, v in set_keys.items())} leave {kept})")
        if self.drop_layers is not None:
            dropped = Counter(teacher.layer_types[i] for i in self.drop_layers if 0 <= i < teacher.num_layers)
            wrong = {kind: keep for kind, keep in set_keys.items() if counts[kind] - dropped[kind] != keep}
            if wrong:
                kind = next(iter(wrong))
                raise UserError(f"target.drop_layers={self.drop_layers} leaves {counts[kind] - dropped[kind]} {kind} "
                                f"layers, not target.{KIND_KEYS[kind]}={wrong[kind]}")

    @staticmethod
    def _check_parallel(target: ModelArch, tp: int, pp: int, ep: int) -> None:
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
        for key in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size") if target.is_moe else ("ffn_hidden_size",):
            if getattr(target, key) is not None and getattr(target, key) % tp:
                raise UserError(f"target.{key}={getattr(target, key)} is not divisible by tp={tp}")
        if target.is_hybrid and target.mamba_num_heads % tp:
            raise UserError(f"target.mamba_num_heads={target.mamba_num_heads} is not divisible by tp={tp}")
        target.check_parallel(tp, pp, ep)
