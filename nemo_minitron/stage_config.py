"""What every stage function shares: the common settings, required keys, timing.

A stage is one step of the Minitron job (import, prune, search, teacher-correct, distill, align,
export, evaluate) as a library function over a typed config: `prune_checkpoint(PruneConfig)`,
`distill_checkpoint(DistillConfig)`, ... The command line (`nemo_minitron.cli`) only composes a
config from overrides and calls one of them; the pipeline calls them in order.

The config classes are the one source of every setting's type, default and description (the comment
on its field, or the comment lines directly above it; scripts/config_reference.py renders them).
A config nested in another is declared with `nested(Class, key=value, ...)`: the class's own
defaults with the changes that hold in that place (the pipeline's main-job values, the search's
retraining), kept as data so `defaults_of` reads every default without making a config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from nemo_minitron.data.corpus import DEFAULT_SOURCES, ensure_corpus
from nemo_minitron.errors import UserError

log = logging.getLogger("nemo_minitron")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"  # bfloat16 where the device computes it natively, float32 elsewhere


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"dtype={name} is not one of {sorted([*DTYPES, AUTO_DTYPE])}")
    return DTYPES[name]


def native_bf16() -> str | None:
    """What computes bf16 natively here, in words (None: nothing): a GPU of compute capability
    8.0 or newer, or a CPU with AMX or AVX512-BF16 instructions (without them torch emulates bf16
    on a CPU, slower than float32)."""
    if torch.cuda.is_available():
        # `including_emulation=False` reads the device properties and allocates nothing on the GPU.
        return "this GPU" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    for name, probe in (("AMX", torch.cpu._is_amx_tile_supported), ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported)):
        if probe():
            return f"this CPU ({name})"
    return None


@functools.cache
def auto_dtype() -> str:
    """What `dtype=auto` means on this machine, decided (and logged) once per process."""
    native = native_bf16()
    if native:
        log.info("dtype=auto is bfloat16 here: %s computes bf16 natively", native)
        return "bfloat16"
    log.info("dtype=auto is float32 here: this %s has no native bf16", "GPU" if torch.cuda.is_available() else "CPU")
    return "float32"


NESTED = "nemo_minitron.nested"  # dataclass field metadata key: (config class, changes) of a nested config


def nested(cls: type, **changes: Any) -> Any:
    """A field holding a `cls` config: `cls`'s defaults with `changes`, where a dict changes the
    config nested under its key key by key (as a YAML block overrides a config). Each config gets
    its own copy of the changes (a list among them is not shared)."""
    return field(default_factory=lambda: updated(cls(), copy.deepcopy(changes)), metadata={NESTED: (cls, changes)})


def updated(config: Any, changes: Mapping[str, Any]) -> Any:
    """A copy of the dataclass `config` with `changes`; a dict value updates the dataclass under its
    key, key by key, instead of replacing it."""
    values = {}
    for key, value in changes.items():
        current = getattr(config, key)
        values[key] = updated(current, value) if isinstance(value, Mapping) and dataclasses.is_dataclass(current) \
            else value
    return dataclasses.replace(config, **values)


def defaults_of(cls: type) -> dict[str, Any]:
    """The defaults of the config class `cls` as a tree of plain values, read from its fields without
    making a config (so `dtype: auto` stays `auto`, as a user writes it, and is not resolved here)."""
    tree: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if NESTED in f.metadata:
            inner, changes = f.metadata[NESTED]
            tree[f.name] = _merged(defaults_of(inner), changes)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                raise TypeError(f"{cls.__name__}.{f.name}: declare a nested config with nested({type(value).__name__})")
            tree[f.name] = value
        else:
            tree[f.name] = f.default
    return tree


def upgrade_old_spellings(cls: type, tree: dict[str, Any]) -> None:
    """Rewrite in `tree` (a composed config of class `cls` as plain values) the deprecated spellings
    that `cls` and the configs nested in it accept but their typed fields cannot hold (a string where
    a nested config now stands), each by its class's `old_spellings(tree)` classmethod, before the
    typed merge. Deprecated keys a field can hold are alias fields, taken in `__post_init__`."""
    hook = getattr(cls, "old_spellings", None)
    if hook is not None:
        hook(tree)
    for f in dataclasses.fields(cls):
        if NESTED in f.metadata and isinstance(tree.get(f.name), dict):
            upgrade_old_spellings(f.metadata[NESTED][0], tree[f.name])


def _merged(tree: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def check_ranges(cfg, prefix: str = "") -> None:
    """UserError naming the first key of the dataclass `cfg` (and the dataclasses nested in it) that
    lies outside the range its class declares: keys in `POSITIVE` must be > 0, keys in `NON_NEGATIVE`
    >= 0; None means unset and passes (required keys are checked where they are needed)."""
    for names, fails, rule in ((getattr(cfg, "POSITIVE", ()), lambda v: v <= 0, "positive"),
                               (getattr(cfg, "NON_NEGATIVE", ()), lambda v: v < 0, "not negative")):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and fails(value):
                raise UserError(f"{prefix}{name}={value} must be {rule}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{prefix}{f.name}.")


@dataclass
class StageConfig:
    """The parallel layout, seed and parameter dtype of a stage (keys `tp`, `pp`, `seed`, `dtype`),
    and whether it may replace its own earlier output made with other settings (`overwrite`).

    `dtype=auto` is resolved when the config is made (`auto_dtype`), so the settings an output
    records and a resumed run compares hold the dtype that ran, never "auto"."""

    tp: int = 1   # tensor-parallel size (must divide query groups, ffn and vocab)
    pp: int = 1   # pipeline-parallel size (must divide the number of layers)
    # expert-parallel size for mixture-of-experts models (must divide the experts; out of the data-parallel ranks)
    ep: int = 1
    seed: int = 1234   # seeds the model-parallel RNGs, data order, random importance and built-in data
    # float32 | bfloat16 | float16 | auto (bfloat16 where the device computes it natively, else float32): parameter
    # dtype on the device
    dtype: str = "float32"
    overwrite: bool = False   # true: replace this stage's earlier output in output_dir made with other settings
    POSITIVE: ClassVar[tuple[str, ...]] = ("tp", "pp", "ep")

    def __post_init__(self) -> None:
        check_ranges(self)  # every stage config is range-checked when it is made, before any work
        if self.dtype == AUTO_DTYPE:
            self.dtype = auto_dtype()
        torch_dtype(self.dtype)  # an unknown name fails here, before any work

    def shared_settings(self) -> dict[str, Any]:
        """The layout, seed and dtype this stage hands to the stages it runs (its dtype only when set:
        the pipeline's `dtype: null` leaves each stage its own)."""
        return {key: getattr(self, key) for key in ("tp", "pp", "ep", "seed", "dtype") if getattr(self, key) is not None}

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def require(self, *keys: str) -> None:
        """UserError for the first of `keys` (attribute names of this config) left unset."""
        for key in keys:
            if getattr(self, key) in (None, ""):
                raise UserError(f"missing required key: set {key}=...")


@dataclass
class CorpusConfig:
    """The built-in text corpus (Debian packages) plus the user's files, split by document."""

    output_dir: str | None = None   # default: <cache_dir>/corpus/<hash of these settings>
    # built-in text sources (docs/design.md section 13)
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES))
    user_paths: list[str] = field(default_factory=list)  # your .txt/.jsonl files or directories, split with the sources
    cache_dir: str | None = None   # default ~/.cache/nemo_minitron/corpus (env NEMO_MINITRON_CACHE)
    seed: int = 0   # seed of the hash that assigns each document to a split
    heldout_fraction: float = 0.05   # share of documents in the held-out split
    calib_fraction: float = 0.05   # share of documents in the calibration split
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("heldout_fraction", "calib_fraction")

    def splits(self) -> dict[str, Path]:
        """The train / calib / heldout jsonl files, built once per settings (collective)."""
        return ensure_corpus(self.output_dir, sources=self.sources, cache_dir=self.cache_dir, seed=self.seed,
                             heldout_fraction=self.heldout_fraction, calib_fraction=self.calib_fraction,
                             user_paths=self.user_paths)


@contextmanager
def timed(record: dict, key: str):
    """Store the wall time of the block in record[key] (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record[key] = round(time.perf_counter() - start, 3)
