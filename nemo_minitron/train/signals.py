"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signal) ask the loop to checkpoint and stop.

The handler only records the request; the loop polls `requested()` after each optimizer step, and
all ranks agree on it (a signal may reach only some of them) before saving and exiting cleanly.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from nemo_minitron import parallel

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager installing the handlers for the duration of training."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def requested(self) -> bool:
        """Whether any rank received a signal (collective: every rank must call it)."""
        flag = torch.tensor([0 if self.received is None else 1], device=parallel.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
