"""Run a test body in N local processes that form a gloo world with megatron's parallel groups.

`run_distributed(fn, world_size=4, tp=2, pp=2, args=(...))` (and `ep=` for expert parallelism) spawns the processes, initialises
`nemo_minitron.parallel` in each, calls `fn(*args)` and returns the per-rank results in rank
order. A failure on any rank is re-raised in the test with that rank's traceback.

A world of one runs in the test's own process (a process costs ~5 s of imports; `parallel` makes a
plain process a world of one): arguments and results still travel by value, torch runs one thread
as in a spawned rank, and megatron's groups are torn down afterwards. `spawn=True` forces a
process where the test needs one of its own (signals, peak memory).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from typing import Any, Callable, Sequence


# Rendezvous ports come from a block of this pytest process's own, below the kernel's ephemeral
# range (32768+ by default), where bind(0), gloo's pair sockets and torchrun never land: a port
# found free is still free when rank 0 binds it, even with pytest-xdist launching worlds in parallel.
_PORT_BLOCK = 1000
_PORT_BASE = 15000
_next_port = itertools.count()


def _free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    block_start = _PORT_BASE + _PORT_BLOCK * (int(worker) if worker.isdigit() else 0)
    for _ in range(_PORT_BLOCK):
        port = block_start + next(_next_port) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # still held by an earlier world's store, or by something else
                continue
        return port
    raise RuntimeError(f"no free port in {block_start}..{block_start + _PORT_BLOCK - 1}")


def _worker(rank: int, world_size: int, port: int, tp: int, pp: int, ep: int, fn: Callable, args: Sequence,
            results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    import warnings

    # megatron warns at import about missing TE/apex in every process; the parent shows what matters.
    warnings.filterwarnings("ignore")
    import torch

    # Processes share two cores; more threads each only adds contention.
    torch.set_num_threads(1)
    results.put((rank, *_run_rank(fn, tp, pp, ep, args)))


def core_share() -> int:
    """This test process's share of the cores: pytest-xdist's workers split them. Two workers at
    torch's default (a thread per core) run twice as many threads as cores, and then each matmul
    takes about twice as long as with one thread each (measured here: 15.4 s against 7.4 s)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def _run_rank(fn: Callable, tp: int, pp: int, ep: int, args: Sequence) -> tuple[bool, bytes | str]:
    """(True, the pickled result) or (False, the traceback) of `fn(*args)` on this rank, between
    `parallel.initialize` and `parallel.destroy`. The result goes by value: a queue's torch pickler
    would pass tensors as file descriptors served by this process, which may have exited by the
    time the parent unpickles them."""
    from nemo_minitron import parallel

    try:
        parallel.initialize(tp=tp, pp=pp, ep=ep)
        return True, pickle.dumps(fn(*args))
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - everything is reported to the caller
        return False, traceback.format_exc()
    finally:
        parallel.destroy()


def _failed(rank: int, trace: str) -> RuntimeError:
    return RuntimeError(f"rank {rank} failed:\n{trace}")


_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def _in_process(fn: Callable, tp: int, pp: int, ep: int, args: Sequence) -> list[Any]:
    """A world of one in this process, as `_worker` would run it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A plain process is a world of one only without a launcher's variables (parallel.initialize).
    launcher = {key: os.environ.pop(key) for key in _LAUNCHER_VARIABLES if key in os.environ}
    try:
        ok, value = _run_rank(fn, tp, pp, ep, pickle.loads(pickle.dumps(args)))
    finally:
        torch.set_num_threads(threads)
        os.environ.update(launcher)
    if not ok:
        raise _failed(0, value)
    return [pickle.loads(value)]


def run_distributed(
    fn: Callable, world_size: int, tp: int = 1, pp: int = 1, args: Sequence = (), timeout: float = 600, ep: int = 1,
    spawn: bool = False,
) -> list[Any]:
    if world_size == 1 and not spawn:
        return _in_process(fn, tp, pp, ep, args)
    # Not daemonic: megatron's checkpoint writer starts worker processes of its own.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, tp, pp, ep, fn, args, results))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    try:
        while len(collected) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"distributed test timed out after {timeout}s; finished ranks: {sorted(collected)}")
            if not ok:
                raise _failed(rank, value)
            collected[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [collected[r] for r in range(world_size)]
