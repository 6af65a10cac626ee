"""Helpers the stage commands share: dtypes, timing, layout checks."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@contextmanager
def timed(record: dict, key: str):
    """Store the wall time of the block in record[key] (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        record[key] = round(time.perf_counter() - start, 3)
