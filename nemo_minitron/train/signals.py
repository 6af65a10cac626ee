"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signal) ask the loop to checkpoint and stop, and
so does Ctrl-C (SIGINT) at a terminal.

The handler only records the request; the loop polls `requested()` after each optimizer step, and
all ranks agree on it (a signal may reach only some of them) before saving and exiting cleanly.
A first Ctrl-C says so on stderr and waits for the step to end; a second one aborts at once
(KeyboardInterrupt, nothing saved after the last checkpoint). The command then exits 130 after a
Ctrl-C and 75 after a pre-emption signal (`exit_code`): a launcher requeues 75, not a person's stop.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from nemo_minitron import parallel
from nemo_minitron.errors import EXIT_INTERRUPTED, EXIT_KEYBOARD_INTERRUPT

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: set[int] = set()  # the signals the latest handler recorded, for `exit_code`


class PreemptionHandler:
    """Context manager installing the handlers for the duration of training."""

    def __init__(self, signals=SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        _received.add(signum)
        if signum == signal.SIGINT:  # the next Ctrl-C aborts; os.write is safe inside a handler
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts)\n")

    def __enter__(self) -> "PreemptionHandler":
        _received.clear()
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


def exit_code() -> int:
    """The exit code of a run stopped at a checkpoint: 130 (128 + SIGINT) after Ctrl-C, else 75."""
    return EXIT_KEYBOARD_INTERRUPT if signal.SIGINT in _received else EXIT_INTERRUPTED
