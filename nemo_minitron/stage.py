"""What every stage function shares: the common settings, required keys, timing.

A stage is one step of the Minitron job (import, prune, search, teacher-correct, distill, align,
export, evaluate) as a library function over a typed config: `prune_checkpoint(PruneConfig)`,
`distill_checkpoint(DistillConfig)`, ... The command line (`nemo_minitron.cli`) only composes a
config from YAML and overrides and calls one of them; the pipeline calls them in order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

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

    tp: int = 1
    pp: int = 1
    ep: int = 1     # expert-parallel size (mixture-of-experts models; carved out of the data-parallel ranks)
    seed: int = 1234
    dtype: str = "float32"
    overwrite: bool = False
    POSITIVE: ClassVar[tuple[str, ...]] = ("tp", "pp", "ep")

    def __post_init__(self) -> None:
        check_ranges(self)  # every stage config is range-checked when it is made, before any work
        if self.dtype == AUTO_DTYPE:
            self.dtype = auto_dtype()
        torch_dtype(self.dtype)  # an unknown name fails here, before any work

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

    output_dir: str | None = None
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_SOURCES))
    user_paths: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    seed: int = 0
    heldout_fraction: float = 0.05
    calib_fraction: float = 0.05
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
