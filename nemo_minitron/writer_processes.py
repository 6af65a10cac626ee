"""Processes megatron's checkpoint writer starts, tied to the process that saves.

megatron-core's `dist_checkpointing.save` forks worker processes that write the shards, and the
first save of a process spawns a multiprocessing manager that collects their results. Killed with
SIGKILL, the saving process leaves them orphaned (measured: the manager, ~270 MB, and the resource
tracker stayed under PID 1; a forked writer, holding a copy of the model, when caught mid-write).
Inside `writers_die_with_parent()` every child forked asks Linux to SIGKILL it when its parent dies
(`PR_SET_PDEATHSIG`, through `os.register_at_fork`); the manager is started here, with the same
request as its initializer, before megatron would start its own. Forks outside the block are not
touched. Linux only; elsewhere the block does nothing.

The manager also ignores SIGTERM, SIGUSR1 and SIGINT. Slurm delivers a pre-emption or time-limit
signal to every process of a job step; a manager killed by it would leave the saving process a
broken pipe, so the pre-emption checkpoint that signal asks for would fail after the run's first
save. It still dies with its parent.

A spawned process imports the `__main__` of its parent: a script run with `python script.py` runs
its top level again there unless that sits under `if __name__ == "__main__":`. Unguarded, the
script's job would start a second time inside the manager; `check_not_importing_main` (called by
`parallel.initialize`, which every stage calls first) stops it there, and the saving process says
what to change instead of failing on a closed pipe.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from nemo_minitron.errors import UserError

_PR_SET_PDEATHSIG = 1
_GUARD_ADVICE = ("megatron's checkpoint writer starts a helper process that imports the script you ran: put the "
                 "script's top level under `if __name__ == \"__main__\":`")
_saving = False  # true inside the block: only children forked then are tied to this process


def _die_with_parent() -> None:
    """Run in a child process: Linux sends it SIGKILL when its parent dies."""
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _manager_init() -> None:
    """The writer manager's initializer: dies with its parent, outlives the signals that ask the
    saving process for a checkpoint (see the module docstring)."""
    _die_with_parent()
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def _after_fork_in_child() -> None:
    if _saving:
        _die_with_parent()


@cache
def _prepare() -> None:
    os.register_at_fork(after_in_child=_after_fork_in_child)
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        # megatron starts this manager lazily on its first save; start it here, dying with us.
        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        try:
            manager.start(initializer=_manager_init)
        except EOFError:  # the helper died before it answered: its own error is printed above
            raise UserError(f"the checkpoint writer's helper process ended as it started; {_GUARD_ADVICE}") from None
        filesystem_async._results_queue = manager.Queue()
        _prepare.manager = manager  # referenced for the life of the process, as megatron's would be


def check_not_importing_main() -> None:
    """UserError in a spawned process that is still importing its parent's `__main__` (see the
    module docstring): the top level of an unguarded script, about to run its job again."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set by spawn until main is imported
        raise UserError(f"this is a helper process importing the script, not the script's run; {_GUARD_ADVICE}")


@contextmanager
def writers_die_with_parent() -> Iterator[None]:
    """Run a megatron checkpoint save inside this block (see the module docstring)."""
    global _saving
    if not sys.platform.startswith("linux"):
        yield
        return
    _prepare()
    _saving = True
    try:
        yield
    finally:
        _saving = False
